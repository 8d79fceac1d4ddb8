"""SDE samplers that expose the exact Gaussian log-probability of every step they take."""

from .ddim import DDIMSDESampler
from .flow import FlowSDESampler

__all__ = ["DDIMSDESampler", "FlowSDESampler"]
