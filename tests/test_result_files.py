"""Every line of exit_results.jsonl keeps the per-example file it points to: calibrated settings, later runs into the
same --output_dir and unlabelled splits each get their own, with indices in the evaluated split."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_runs import make_tiny_model, read_details, read_records, run_main, sst2_rows, write_sst2

from multiexit.runner import evaluation

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.mark.slow
def test_no_record_loses_its_per_example_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # both runs start "in the same second", so their run folders must still differ
    monkeypatch.setattr(evaluation.time, "strftime", lambda *args: "20260101-000000")
    model = make_tiny_model(tmp_path / "model", layers=3, multi_exit=True)
    data = write_sst2(tmp_path / "SST-2", train=8, dev=16)
    output_dir = tmp_path / "out"
    common = ["--model_name_or_path", model, "--task_name", "sst-2", "--data_dir", data, "--output_dir", output_dir,
              "--max_seq_length", 32, "--do_eval"]
    # calibration chooses among the requested settings, so its choice has the label of one of them
    status, stderr = run_main([*common, "--patience", "1,2", "--budget_layer", "1,2", "--calibrate_speedup", "1.2"])
    assert status == 0, stderr
    status, stderr = run_main([*common, "--patience", "1", "--max_eval_samples", "6"])  # a later, smaller run
    assert status == 0, stderr

    records = read_records(output_dir)
    calibrated = [r for r in records if "calibration" in r]
    assert {"pabee", "budget"} <= {r["policy"] for r in calibrated}
    for record in records:
        rows = read_details(output_dir, record)
        first = 8 if "calibration" in record else 0  # calibration scores the second half of the 16
        assert [row[0] for row in rows] == list(range(first, first + record["num_examples"])), record
    assert {r["num_examples"] for r in records} == {16, 8, 6}
    calibrated_files = {r["per_example_file"] for r in calibrated}
    assert not calibrated_files & {r["per_example_file"] for r in records if "calibration" not in r}


def test_unlabelled_split_still_writes_the_full_depth_predictions(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    model = make_tiny_model(tmp_path / "model", layers=2, multi_exit=True)
    data = write_sst2(tmp_path / "SST-2", train=8, dev=4)
    sentences = [row.split("\t")[0] for row in sst2_rows(5, seed=7)]
    (data / "test.tsv").write_text("index\tsentence\n" + "".join(f"{i}\t{s}\n" for i, s in enumerate(sentences)),
                                   encoding="utf-8")
    output_dir = tmp_path / "out"
    status, stderr = run_main(["--model_name_or_path", model, "--task_name", "sst-2", "--data_dir", data,
                               "--output_dir", output_dir, "--max_seq_length", 32, "--do_eval", "--eval_split", "test",
                               "--calibrate_speedup", "1.5"])
    assert status == 0, stderr
    assert "the test split has no labels, so nothing is calibrated" in caplog.text
    (record,) = read_records(output_dir)
    assert record["policy"] == "budget" and record["params"] == {"layer": 2} and record["split"] == "test"
    rows = read_details(output_dir, record)
    assert [row[0] for row in rows] == list(range(5)) and all(row[1] == 2 and row[3] == "" for row in rows)
    # and as GLUE's server reads them: SST-2.tsv, each index with its label name
    submission = output_dir / record["submission_file"]
    assert submission.name == "SST-2.tsv"
    lines = submission.read_text().splitlines()
    assert lines[0] == "index\tprediction"
    assert [line.split("\t") for line in lines[1:]] == [[str(row[0]), str(row[2])] for row in rows]
