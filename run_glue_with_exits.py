#!/usr/bin/env python
"""Train and evaluate multi-exit BERT / RoBERTa / ALBERT on GLUE and friends, and sweep every exit policy.

The design card's runner: ``python run_glue_with_exits.py --help``. The script itself lives in
:mod:`multiexit.runner.main` (arguments → checks → data → model → training → evaluation); this file runs it, and
``run_glue_with_exits.main(argv)`` returns the evaluation's results dict as HF's example scripts do.
"""

import sys

from multiexit.runner.main import *  # noqa: F403 - this module is the package's public face
from multiexit.runner.main import __all__, cli  # noqa: F401

if __name__ == "__main__":
    sys.exit(cli())
