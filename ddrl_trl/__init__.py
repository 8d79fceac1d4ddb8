"""ddrl-trl: DDRL (Data-regularized Diffusion Reinforcement Learning) for diffusers pipelines, the TRL way.

The public names below are imported on first use, so that light entry points (the reward server, `ddrl-trl --help`)
do not load every diffusers pipeline: `from ddrl_trl import DDRLTrainer` works as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name → the submodule that defines it.
_EXPORTS = {
    "DDRLConfig": ".config",
    "DDRLTrainer": ".trainer",
    "HackingMonitorCallback": ".monitoring.hacking_monitor",
    "PipelineAdapter": ".adapters",
    "RemoteReward": ".service",
    "build_synthetic_reference_dataset": ".data",
    "get_adapter": ".adapters",
    "load_reward": ".rewards",
    "register_adapter": ".adapters",
    "supported_pipelines": ".adapters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: `ddrl_trl.rewards`, ...
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'ddrl_trl' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # static analysers and IDEs see the names (re-exported through __all__)
    from .adapters import PipelineAdapter, get_adapter, register_adapter, supported_pipelines
    from .config import DDRLConfig
    from .data import build_synthetic_reference_dataset
    from .monitoring.hacking_monitor import HackingMonitorCallback
    from .rewards import load_reward
    from .service import RemoteReward
    from .trainer import DDRLTrainer
