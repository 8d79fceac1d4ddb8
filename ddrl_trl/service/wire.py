"""The payload of the reward service, shared by server and client.

A request is JSON: `{"images": {"shape": [B, 3, H, W] | [B, F, 3, H, W], "dtype": "uint8", "data": <base64>},
"prompts": [B strings], "columns": {name: [B JSON values]}}`. Samples travel as 8-bit pixels (what a saved image
holds; 4× smaller than float32 and exact to 1/255), and are handed to the reward as float32 in [0, 1] again.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field


class SampleArray(BaseModel):
    """A batch of images or videos as base64-encoded uint8 pixels."""

    model_config = ConfigDict(extra="forbid")
    shape: list[int] = Field(min_length=4, max_length=5)
    dtype: Literal["uint8"] = "uint8"
    data: str


class ScoreRequest(BaseModel):
    """One scoring request: samples, their prompts and any extra dataset columns."""

    model_config = ConfigDict(extra="forbid")
    images: SampleArray
    prompts: list[str]
    columns: dict[str, list[Any]] = Field(default_factory=dict)


def check_token(token: str, source: str) -> None:
    """Raise `ValueError` naming `source` unless `token` is usable in an `Authorization: Bearer` header: non-empty
    printable ASCII on one line (a token with an inner line break or tab could never match)."""
    if not token:
        raise ValueError(f"{source} is empty: write a secret into it.")
    if not all(32 <= ord(char) <= 126 for char in token):
        raise ValueError(
            f"{source} holds a line break, a tab, a control or a non-ASCII character inside the token, which an HTTP "
            f"header cannot carry, so no client could ever match it. Use one line of printable ASCII, e.g. "
            f'`python -c "import secrets; print(secrets.token_urlsafe(32))"`.'
        )


class PayloadError(ValueError):
    """A request that parses but cannot be scored (inconsistent shapes or lengths)."""


def encode_samples(samples: torch.Tensor) -> dict:
    """`(B, 3, H, W)` or `(B, F, 3, H, W)` floats in [0, 1] → the `images` field (one host copy, uint8)."""
    pixels = (samples.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return {"shape": list(pixels.shape), "dtype": "uint8", "data": base64.b64encode(pixels.tobytes()).decode("ascii")}


def decode_samples(array: SampleArray) -> torch.Tensor:
    """The `images` field → its uint8 pixels `(B, ...)` (kept so until scored: 4× less memory than float32);
    `PayloadError` if the bytes do not match the shape. `to_unit_floats` gives what rewards receive."""
    shape = array.shape
    if any(d <= 0 for d in shape) or shape[-3] != 3:
        raise PayloadError(f"images.shape must be [B, 3, H, W] or [B, F, 3, H, W] with positive sizes, got {shape}")
    try:
        raw = base64.b64decode(array.data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise PayloadError(f"images.data is not valid base64: {err}") from err
    if len(raw) != math.prod(shape):
        raise PayloadError(f"images.data holds {len(raw)} bytes but images.shape {shape} needs {math.prod(shape)}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy())


def to_unit_floats(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float32 in [0, 1], as rewards receive samples."""
    return pixels.float() / 255.0


def check_lengths(request: ScoreRequest, batch: int) -> None:
    """Every prompt list and column must have one entry per sample."""
    if len(request.prompts) != batch:
        raise PayloadError(f"{len(request.prompts)} prompts for {batch} samples: send one prompt per sample")
    bad = {name: len(values) for name, values in request.columns.items() if len(values) != batch}
    if bad:
        raise PayloadError(f"columns {bad} do not have one value per sample ({batch})")


def json_columns(columns: dict[str, list]) -> dict[str, list]:
    """The columns that survive JSON (others — images, tensors — cannot cross the wire and are left out)."""
    kept = {}
    for name, values in columns.items():
        try:
            json.dumps(values)
        except (TypeError, ValueError):
            continue
        kept[name] = values
    return kept
