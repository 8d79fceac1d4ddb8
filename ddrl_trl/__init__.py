"""ddrl-trl: DDRL (Data-regularized Diffusion Reinforcement Learning) for diffusers pipelines, the TRL way."""

from .adapters import PipelineAdapter, get_adapter, register_adapter, supported_pipelines
from .callbacks import HackingMonitorCallback
from .config import DDRLConfig
from .data import build_synthetic_reference_dataset
from .rewards import load_reward
from .service import RemoteReward
from .trainer import DDRLTrainer

__version__ = "0.1.0"

__all__ = [
    "DDRLConfig",
    "DDRLTrainer",
    "HackingMonitorCallback",
    "PipelineAdapter",
    "RemoteReward",
    "build_synthetic_reference_dataset",
    "get_adapter",
    "load_reward",
    "register_adapter",
    "supported_pipelines",
]
