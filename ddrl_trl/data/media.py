"""Reading reference samples: images (PIL, paths, bytes, arrays) and videos (frame lists, arrays, files), read by
what they are, never guessed into white: 16-bit images (PIL modes `I;16*`, `uint16` arrays) are scaled from
0..65535, other integer arrays must hold 0..255, float arrays must lie in [0, 1], transparent pixels are composited
over white and EXIF orientation is applied; anything else is refused naming the fix. Images and videos alike may be
upscaled to the resolution by at most `max_upscale`."""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence

from ..errors import ReferenceSampleError

logger = logging.getLogger(__name__)


def load_image(value) -> Image.Image:
    """Open a reference image given as PIL image, path, bytes, `{"bytes"|"path": ...}` dict, array or nested list
    (how `datasets` returns an array column), as 8-bit RGB.

    Files are decoded now (a truncated one fails here, not mid-training) and turned upright by their EXIF
    orientation; 16-bit and float images, arrays and transparency are converted by `to_rgb`."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    elif isinstance(value, (np.ndarray, torch.Tensor, list, tuple)):  # `datasets` hands arrays back as nested lists
        return to_rgb(array_to_image(np.asarray(value) if isinstance(value, (list, tuple)) else value))
    else:
        raise TypeError(f"expected a PIL image, a path, bytes or an array, got {type(value).__name__}")
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def array_to_image(value) -> Image.Image:
    """An image array — `(H, W)`, `(H, W, C)` or a tensor's `(C, H, W)`, C in {1, 3, 4} — as an 8-bit PIL image.

    Values are read by dtype: uint8 as is; uint16 as 16-bit (0..65535); other integers must hold 0..255; floats must
    lie in [0, 1] (within 1e-3, then clipped); bool as black/white. Anything else raises `ReferenceSampleError`."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels first, as tensors hold images
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ReferenceSampleError(
            f"an array of shape {array.shape} is not an image: expected (H, W), (H, W, 1|3|4) or (1|3|4, H, W)"
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.round(array.astype(np.float32) / 257.0).astype(np.uint8)  # 65535 / 257 = 255
    elif np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ReferenceSampleError(
                f"an integer ({array.dtype}) image with values {low}..{high}: integer images must hold 0..255; pass "
                f"16-bit data as uint16, or rescale it to uint8"
            )
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ReferenceSampleError("a float image holding NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise ReferenceSampleError(
                f"a float image with values {low:.4g}..{high:.4g}: float images must lie in [0, 1]; divide 0..255 "
                f"data by 255, map [-1, 1] data with (x + 1) / 2, or pass uint8"
            )
        array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ReferenceSampleError(
            f"an array of dtype {array.dtype} is not an image; pass uint8, uint16 or floats in [0, 1]"
        )
    return Image.fromarray(np.ascontiguousarray(array))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL image: 16-bit (`I;16*`, scaled from 0..65535) and 32-bit modes (`I`, `F`: read as int32 /
    float32 arrays) by their values, through `array_to_image` (PIL's own conversion clips 16-bit values to 255, i.e.
    white); transparency composited over white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return to_rgb(array_to_image(np.asarray(image).astype(np.uint16)))
    if image.mode in ("I", "F"):  # 32-bit integers or floats: read like an int32 / float32 array
        return to_rgb(array_to_image(np.asarray(image)))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def upscale_factor(width: int, height: int, resolution: int, max_upscale: float) -> float:
    """How much a `width`×`height` sample is upscaled to reach `resolution` (≤ 1: not at all); raises
    `ReferenceSampleError` above `max_upscale`: upscaled references anchor the model to blur."""
    factor = resolution / min(width, height)
    if factor > max_upscale:
        raise ReferenceSampleError(
            f"it is {width}x{height} px, which would be upscaled {factor:.2f}x to resolution={resolution} (more than "
            f"max_reference_upscale={max_upscale:g}): use references whose short side is at least "
            f"{resolution / max_upscale:.0f} px, lower resolution, or raise max_reference_upscale"
        )
    return factor


def resize_center_crop(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, centre-crop a square, return `(3, R, R)` float in [−1, 1]."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return array / 127.5 - 1.0


def load_video_frames(value) -> list[Image.Image]:
    """Frames of a reference video given as a list of frames (anything `load_image` reads), a `(F, H, W, 3)` array,
    or a video file (path or `{"path": ...}` dict; MP4 and the like need `pip install "ddrl-trl[video]"`, GIF not)."""
    if isinstance(value, dict) and value.get("bytes"):
        return _frames_from_bytes(value["bytes"], value.get("path"))
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, (str, os.PathLike)):
        from diffusers.utils import load_video

        try:
            return [load_image(frame) for frame in load_video(os.fspath(value))]  # GIF frames come as palette images
        except ImportError as err:
            raise ImportError(
                f'Reading video files needs imageio with its ffmpeg plugin: pip install "ddrl-trl[video]" ({err}).'
            ) from err
    if isinstance(value, (np.ndarray, torch.Tensor)) and np.asarray(value).ndim == 4:
        return [load_image(frame) for frame in np.asarray(value)]
    if isinstance(value, (list, tuple)):
        return [load_image(frame) for frame in value]
    kind = "a single image" if isinstance(value, (Image.Image, np.ndarray, torch.Tensor)) else type(value).__name__
    raise ReferenceSampleError(
        f"expected a video (a list of frames, an (F, H, W, 3) array or a video file), got {kind}"
    )


def _frames_from_bytes(data: bytes, name: str | None) -> list[Image.Image]:
    """Frames of an encoded file held in memory: animated images through PIL, other formats through a temp file."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 — not an image format PIL knows: try it as a video file
        import tempfile

        suffix = os.path.splitext(name or "")[1] or ".mp4"
        with tempfile.NamedTemporaryFile(suffix=suffix) as file:
            file.write(data)
            file.flush()
            return load_video_frames(file.name)
    if getattr(image, "n_frames", 1) == 1:
        raise ReferenceSampleError(
            "expected a video (a list of frames, an (F, H, W, 3) array or a video file), got a single image"
        )
    return [load_image(frame.copy()) for frame in ImageSequence.Iterator(image)]


def video_to_tensor(
    frames: list[Image.Image], resolution: int, num_frames: int, max_upscale: float = 2.0
) -> torch.Tensor:
    """`(F, 3, R, R)` in [−1, 1] from `frames`, after checking they fit: exactly `num_frames` frames, one frame size,
    upscaled at most `max_upscale` times (`upscale_factor`, the same rule as images)."""
    if len(frames) != num_frames:
        raise ReferenceSampleError(
            f"the video has {len(frames)} frames but num_frames={num_frames}: trim or resample the reference videos "
            f"to {num_frames} frames, or set num_frames in DDRLConfig to their length (4k + 1 for Wan)"
        )
    sizes = sorted({frame.size for frame in frames})
    if len(sizes) > 1:
        raise ReferenceSampleError(f"the video's frames differ in size ({sizes}); every frame must have the same size")
    upscale_factor(*sizes[0], resolution, max_upscale)  # refuses above max_upscale
    return torch.stack([resize_center_crop(frame, resolution) for frame in frames])
