"""Saving and reloading the trained weights in diffusers' own formats, never leaving a half-written file behind,
never writing non-finite weights, and naming the file when one cannot be read back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable

import torch
from peft import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import CheckpointError, NonFiniteWeightsError  # noqa: F401 — raised here, imported from here too

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: Where diffusers' `save_lora_weights` stores the LoRA config (`*_lora_adapter_metadata`) in the safetensors header.
LORA_METADATA_KEY = "lora_adapter_metadata"
#: LoRA config fields that set the adapter's shape and strength: a checkpoint must match the live adapter on them.
LORA_STRENGTH_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")


def first_non_finite(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding NaN or ±inf, or None."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


@contextlib.contextmanager
def atomic_directory_update(output_dir: str):
    """Yield a staging folder inside `output_dir`; on success move each entry into `output_dir` atomically.

    A crash or a full disk while writing leaves the staging folder (`.tmp-save-*`, removed here on error) and the
    previous files untouched: a reader sees either the old or the new version of each file, never a partial one.
    """
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-save-", dir=output_dir)
    try:
        yield staging
        for name in os.listdir(staging):
            source, target = os.path.join(staging, name), os.path.join(output_dir, name)
            if os.path.isdir(source) and os.path.isdir(target):
                trash = tempfile.mkdtemp(prefix=".tmp-old-", dir=output_dir)
                os.replace(target, os.path.join(trash, name))
                os.replace(source, target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write(path: str, write) -> str:
    """`write(staging)` into `<path>.tmp`, then rename it to `path` (atomic): a reader or a crash never meets a
    half-written file, and a failed write (a full disk) leaves neither file behind. Returns `path`."""
    staging = f"{path}.tmp"
    try:
        write(staging)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(staging)
        raise
    return path


def _read_safetensors(path: str, checkpoint_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of `path`; `CheckpointError` naming the file if it is missing, damaged or holds
    non-finite values."""
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint {checkpoint_dir} has no {os.path.relpath(path, checkpoint_dir)}.")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
        tensors = load_file(path)
    except Exception as err:  # noqa: BLE001 — safetensors raises its own error types for damaged files
        raise CheckpointError(
            f"{path} in checkpoint {checkpoint_dir} is unreadable ({err}): the file is truncated or corrupt. Resume "
            f"from an earlier checkpoint-N."
        ) from err
    bad = first_non_finite(tensors.items())
    if bad is not None:
        raise CheckpointError(
            f"{path} in checkpoint {checkpoint_dir} holds non-finite values (NaN or ±inf) in {bad!r}: the run had "
            f"diverged when it was written. Resume from an earlier checkpoint-N."
        )
    return tensors, metadata


def load_checkpoint_file(path: str, checkpoint_dir: str):
    """`torch.load(path)` of tensors only (no pickled code); `CheckpointError` naming the file if it is damaged."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — torch raises several types for a damaged archive
        raise CheckpointError(
            f"{path} in checkpoint {checkpoint_dir} is unreadable ({err}): the file is truncated or corrupt. Resume "
            f"from an earlier checkpoint-N."
        ) from err


def lora_metadata(metadata: dict[str, str], denoiser_name: str) -> dict | None:
    """The LoRA config diffusers stored in a safetensors header for `denoiser_name` (keys without the prefix)."""
    if LORA_METADATA_KEY not in metadata:
        return None
    packed = json.loads(metadata[LORA_METADATA_KEY])
    prefix = f"{denoiser_name}."
    return {k[len(prefix) :]: v for k, v in packed.items() if k.startswith(prefix)}


def load_lora_into_denoiser(denoiser: torch.nn.Module, checkpoint_dir: str, denoiser_name: str) -> None:
    """Load `pytorch_lora_weights.safetensors` written by `save_lora_weights` back into the active adapter, after
    checking that the file is readable, finite, and of the adapter's shape and strength (r, alpha, patterns)."""
    path = os.path.join(checkpoint_dir, LORA_WEIGHTS_NAME)
    state, metadata = _read_safetensors(path, checkpoint_dir)
    saved = lora_metadata(metadata, denoiser_name)
    if saved is not None:
        live = denoiser.peft_config["default"].to_dict()
        different = [
            f"{k}: file {saved.get(k)!r}, trainer {live.get(k)!r}"
            for k in LORA_STRENGTH_FIELDS
            if k in saved and saved.get(k) != live.get(k)
        ]
        if different:
            raise CheckpointError(
                f"{path} holds a LoRA of another shape or strength than this trainer's peft_config "
                f"({'; '.join(different)}): pass the LoraConfig the checkpoint was trained with."
            )
    prefix = f"{denoiser_name}."
    state = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
    result = set_peft_model_state_dict(denoiser, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise CheckpointError(f"{path} holds LoRA weights this model has no place for: {unexpected[:5]}...")


def load_full_denoiser(denoiser: torch.nn.Module, checkpoint_dir: str, denoiser_name: str) -> None:
    """Load a full denoiser saved by `save_pretrained` under `checkpoint_dir/<denoiser_name>`, checking every file."""
    folder = os.path.join(checkpoint_dir, denoiser_name)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
    if not files:
        raise CheckpointError(f"Checkpoint {checkpoint_dir} has no {denoiser_name}/*.safetensors weights.")
    state = {}
    for name in files:
        state.update(_read_safetensors(os.path.join(folder, name), checkpoint_dir)[0])
    try:
        denoiser.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"The weights in {folder} do not fit this denoiser: {err}") from err
