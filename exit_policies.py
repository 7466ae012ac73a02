"""The exit policies (PABEE, DeeBERT, PCEE-BERT, ELBERT, budget, max-prob), ``ExitTracker`` and ``replay``.

The design card's entry point: the code lives in :mod:`multiexit.policies`; this file names what it exports, so
``from exit_policies import PatienceExit`` keeps working.
"""

from multiexit.policies import *  # noqa: F403 - this module is the package's public face
from multiexit.policies import __all__  # noqa: F401
