"""Multi-exit BERT and RoBERTa for sequence classification: an exit head after every layer.

The design card's entry point: the code lives in :mod:`multiexit.bert` (the shared layer loop, heads and losses in
:mod:`multiexit.modeling`); this file names what it exports.
"""

from multiexit.bert import *  # noqa: F403 - this module is the package's public face
from multiexit.bert import __all__  # noqa: F401
