"""Installing: the design card's four files and the one ``multiexit`` package are all that ``pip install .`` puts at
the top level, and a non-editable install into a fresh virtual environment gives a runner that works from another
directory."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from tiny_runs import make_tiny_model, write_sst2

ROOT = Path(__file__).resolve().parents[1]
# the design card's entry points: the only modules at the top level besides the package, each its public face
DESIGN_CARD_MODULES = {"exit_policies", "modeling_multiexit_albert", "modeling_multiexit_bert", "run_glue_with_exits"}


def listed_modules() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config["options"]["py_modules"].split()


def test_only_the_design_card_modules_sit_at_the_top_level() -> None:
    assert set(listed_modules()) == DESIGN_CARD_MODULES
    assert {path.stem for path in ROOT.glob("*.py")} == DESIGN_CARD_MODULES


def test_no_file_patches_sys_path() -> None:
    """Scripts, tests and benchmarks import the installed package; none reaches into the repository by hand."""
    patched = [str(path.relative_to(ROOT)) for path in ROOT.rglob("*.py")
               if ".venv" not in path.parts and "sys.path.insert" in path.read_text(encoding="utf-8")
               and path != Path(__file__)]
    assert patched == []


def test_the_faces_export_the_package_objects() -> None:
    """Each design-card file is the package's public face: the same objects, nothing written twice."""
    import exit_policies
    import modeling_multiexit_albert
    import modeling_multiexit_bert
    import multiexit.albert
    import multiexit.bert
    import multiexit.policies
    import multiexit.runner.main
    import run_glue_with_exits

    for face, module in ((exit_policies, multiexit.policies), (modeling_multiexit_bert, multiexit.bert),
                         (modeling_multiexit_albert, multiexit.albert), (run_glue_with_exits, multiexit.runner.main)):
        assert face.__all__ == module.__all__
        for name in module.__all__:
            assert getattr(face, name) is getattr(module, name), name


@pytest.mark.slow
def test_fresh_non_editable_install_runs_from_another_directory(tmp_path: Path) -> None:
    # the project, copied without its virtual environment, run outputs and git folder
    source = tmp_path / "source"
    skipped = (".venv", ".git", "runs", "outputs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*skipped))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # dependencies (torch, transformers, ..., and pip and setuptools to install with) come from this test's
    # environment through a plain path entry, which does not activate the editable install of the project that this
    # environment may hold: the project itself can only be imported from what pip installs below
    fresh_site = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    Path(fresh_site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                              str(source)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    installed = {path.stem for path in Path(fresh_site).glob("*.py")}
    assert installed == DESIGN_CARD_MODULES
    packages = {path.name for path in Path(fresh_site).iterdir() if (path / "__init__.py").exists()}
    assert packages == {"multiexit"}

    # a tiny model and data set, and a run of the installed console script from an unrelated directory
    model = make_tiny_model(tmp_path / "model", layers=2, multi_exit=True)
    data = write_sst2(tmp_path / "SST-2", train=4, dev=6)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH",)}
    env["HF_HUB_OFFLINE"] = "1"
    where = subprocess.run([python, "-c", "import run_glue_with_exits; print(run_glue_with_exits.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.strip().startswith(fresh_site), where.stdout
    run = subprocess.run([venv / "bin" / "run_glue_with_exits", "--model_name_or_path", str(model), "--task_name",
                          "sst-2", "--data_dir", str(data), "--output_dir", str(tmp_path / "out"),
                          "--max_seq_length", "32", "--do_eval", "--patience", "1"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out" / "exit_results.jsonl").stat().st_size > 0
