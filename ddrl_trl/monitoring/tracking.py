"""Image grids of rollouts and validation samples, readable (enlarged, captioned), and sending them to the
experiment trackers the Trainer was configured with (`report_to`)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from transformers.integrations import TensorBoardCallback

from ..rewards import to_pil


def still_images(images: torch.Tensor) -> torch.Tensor:
    """Images `(B, 3, H, W)` as they are; videos `(B, F, 3, H, W)` by their middle frame."""
    return images[:, images.shape[1] // 2] if images.ndim == 5 else images


#: Grid layout: tiles are upscaled (nearest neighbour, by a whole factor) to at least this many pixels a side...
MIN_TILE_PIXELS = 128
#: ...separated by this many pixels of background, each row under a caption strip of this height.
TILE_GAP = 4
CAPTION_HEIGHT = 18
_BACKGROUND, _TEXT = (255, 255, 255), (0, 0, 0)


def image_grid(images: torch.Tensor, cols: int | None = None, captions: list[str] | None = None) -> Image.Image:
    """A readable grid of `images` `(B, 3, H, W)` in [0, 1] (videos `(B, F, 3, H, W)` by their middle frame), `cols`
    wide (None: near-square), row by row: tiles smaller than `MIN_TILE_PIXELS` are upscaled by a whole factor (pixels
    stay sharp), `TILE_GAP` pixels of white between tiles, and with `captions` (one per image) each row's caption
    above it (its images' distinct captions, joined by " | ", shortened to fit).

    Size: width `cols·s + (cols + 1)·gap`, height `rows·(caption + s + gap) + gap`, `s` the upscaled tile side (the
    caption strip is 0 high without captions)."""
    pil = to_pil(still_images(images))
    cols = cols or math.ceil(math.sqrt(len(pil)))
    rows = math.ceil(len(pil) / cols)
    width, height = pil[0].size
    scale = max(1, math.ceil(MIN_TILE_PIXELS / min(width, height)))
    tile_w, tile_h = width * scale, height * scale
    caption_h = CAPTION_HEIGHT if captions is not None else 0
    grid = Image.new("RGB", (cols * tile_w + (cols + 1) * TILE_GAP, rows * (caption_h + tile_h + TILE_GAP) + TILE_GAP))
    grid.paste(_BACKGROUND, (0, 0, *grid.size))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=CAPTION_HEIGHT - 6)
    for row in range(rows):
        top = TILE_GAP + row * (caption_h + tile_h + TILE_GAP)
        members = range(row * cols, min((row + 1) * cols, len(pil)))
        if captions is not None:
            text = _fit(" | ".join(dict.fromkeys(captions[i] for i in members)), font, grid.width - 2 * TILE_GAP)
            draw.text((TILE_GAP, top + 2), text, fill=_TEXT, font=font)
        for col, index in enumerate(members):
            tile = pil[index].resize((tile_w, tile_h), Image.Resampling.NEAREST) if scale > 1 else pil[index]
            grid.paste(tile, (TILE_GAP + col * (tile_w + TILE_GAP), top + caption_h))
    return grid


def _fit(text: str, font, width: int) -> str:
    """`text`, shortened with "…" to fit `width` pixels in `font`."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def log_image_grid(callbacks, grid: Image.Image, captions: list[str], step: int, tag: str = "samples") -> bool:
    """Log an image `grid` to TensorBoard and/or W&B (whichever `report_to` set up); returns whether any took it."""
    logged = False
    for callback in callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            callback.tb_writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
            callback.tb_writer.add_text(f"{tag}/prompts", " | ".join(captions), step)
            callback.tb_writer.flush()
            logged = True
        elif type(callback).__name__ == "WandbCallback" and getattr(callback, "_wandb", None) is not None:
            run = callback._wandb.run
            if run is not None:
                run.log({tag: callback._wandb.Image(grid, caption=" | ".join(captions))}, commit=False)
                logged = True
    return logged
