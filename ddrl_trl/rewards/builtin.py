"""Rewards that need no model weights."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float images `(B, 3, H, W)` in [0, 1] → list of RGB PIL images (one host copy for the whole batch)."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def brightness(images: torch.Tensor, prompts: list[str], **_) -> list[float]:
    """Mean pixel intensity in [0, 1] of images `(B, 3, H, W)` or videos `(B, F, 3, H, W)`: a deliberately hackable
    reward (more ink / light always scores higher)."""
    return images.float().flatten(1).mean(dim=1).tolist()


BUILTIN_REWARDS = {"brightness": brightness}
