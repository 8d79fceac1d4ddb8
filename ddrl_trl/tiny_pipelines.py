"""Deprecated name of `ddrl_trl.testing` (the tiny offline pipelines for tests)."""

import warnings

from .testing import *  # noqa: F403
from .testing import __all__  # noqa: F401

warnings.warn(
    "ddrl_trl.tiny_pipelines is now ddrl_trl.testing (test utilities): import from there.", FutureWarning, stacklevel=2
)
