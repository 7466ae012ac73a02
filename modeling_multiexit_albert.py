"""Multi-exit ALBERT for sequence classification: an exit head after every depth of its shared layers.

The design card's entry point: the code lives in :mod:`multiexit.albert` (the shared layer loop, heads and losses in
:mod:`multiexit.modeling`); this file names what it exports.
"""

from multiexit.albert import *  # noqa: F403 - this module is the package's public face
from multiexit.albert import __all__  # noqa: F401
