import os
from pathlib import Path

import pytest
import torch

# The tests import the installed project (make install: an editable install), never the folder they sit in.
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The optional shared data folder ($MULTIEXIT_SHARED_DIR, else <repo>/../shared); tests using it skip without it.

    The project must work without this folder, so nothing may require it.
    """
    configured = os.environ.get("MULTIEXIT_SHARED_DIR")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set MULTIEXIT_SHARED_DIR to use it)")
    return path


@pytest.fixture(scope="module")
def one_intra_op_thread() -> object:
    """For modules of tiny tensors (``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``): intra-op threads
    only add synchronisation there, and OpenMP spinning on a busy 2-core machine made them 10-30x slower. The setting
    is restored for the other modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
