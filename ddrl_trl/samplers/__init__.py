"""SDE samplers that expose the exact Gaussian log-probability of every step they take."""

from .ddim import DDIMSDESampler
from .flow import FlowSDESampler, image_token_shift_mu, pipeline_base_sigmas

__all__ = ["DDIMSDESampler", "FlowSDESampler", "image_token_shift_mu", "pipeline_base_sigmas"]
