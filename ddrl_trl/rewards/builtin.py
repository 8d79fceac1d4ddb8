"""Rewards that need no model weights."""

from __future__ import annotations

import io

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


def as_frames(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Images `(B, 3, H, W)` → themselves and 1; videos `(B, F, 3, H, W)` → their `B·F` frames `(B·F, 3, H, W)` and
    `F`, so a per-image scorer can score every frame and average each video's `F` scores."""
    if images.ndim == 4:
        return images, 1
    if images.ndim == 5:
        return images.flatten(0, 1), images.shape[1]
    raise ValueError(
        f"Rewards take images (B, 3, H, W) or videos (B, F, 3, H, W); got a tensor of shape {tuple(images.shape)}."
    )


def jpeg_incompressibility(images: torch.Tensor, prompts: list[str], **_) -> list[float]:
    """Size in kB (bytes / 1000) of each image saved as JPEG at quality 95, as in DDPO (Black et al. 2023): busier,
    noisier images score higher. Videos `(B, F, 3, H, W)` score the mean over their frames."""
    frames, per_video = as_frames(images)
    sizes = []
    for frame in to_pil(frames):
        buffer = io.BytesIO()
        frame.save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float64).view(-1, per_video).mean(dim=1).tolist()


def jpeg_compressibility(images: torch.Tensor, prompts: list[str], **_) -> list[float]:
    """Minus the JPEG size in kB of `jpeg_incompressibility` (DDPO): smoother, simpler images score higher."""
    return [-size for size in jpeg_incompressibility(images, prompts)]


BUILTIN_REWARDS = {
    "brightness": brightness,
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
}
