"""Classifier-free guidance of a denoiser's two branches, as pure float32 math.

    ε̂ = ε_∅ + w · (ε_c − ε_∅)                                   (Ho & Salimans 2022; diffusers' form)

Some pipelines add a per-token rescale on top (Qwen-Image's true CFG, `pipeline_qwenimage.py`):

    ε̂' = ε̂ · ‖ε_c‖ / ‖ε̂‖                                        (norms over each token's channels)

The policy's log-probabilities are built on these outputs, so both are float32 under bf16 too.
"""

from __future__ import annotations

import torch


def combine_guidance(cond_output: torch.Tensor, uncond_output: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̂ = ε_∅ + w (ε_c − ε_∅), in float32."""
    uncond_output = uncond_output.float()
    return uncond_output + scale * (cond_output.float() - uncond_output)


def rescale_to_conditional_norm(guided: torch.Tensor, cond_output: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """ε̂ · ‖ε_c‖ / ‖ε̂‖ with norms along `dim`, in float32: the guided output with the conditional output's norm."""
    guided, cond_output = guided.float(), cond_output.float()
    return guided * (cond_output.norm(dim=dim, keepdim=True) / guided.norm(dim=dim, keepdim=True))
