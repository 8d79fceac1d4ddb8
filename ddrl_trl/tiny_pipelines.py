"""Deprecated name of `ddrl_trl.testing` (the tiny offline pipelines for tests).

Kept while `shared/bench/peer_ddpo_bench.py`, the benchmark against TRL's DDPOTrainer, imports it from here; delete it
when that script imports `ddrl_trl.testing`."""

import warnings

from .testing import *  # noqa: F403
from .testing import __all__  # noqa: F401

warnings.warn(
    "ddrl_trl.tiny_pipelines is now ddrl_trl.testing (test utilities): import from there.", FutureWarning, stacklevel=2
)
