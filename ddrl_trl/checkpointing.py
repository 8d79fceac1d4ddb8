"""Saving and reloading the trained weights in diffusers' own formats, never leaving a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


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


def load_lora_into_denoiser(denoiser: torch.nn.Module, checkpoint_dir: str, denoiser_name: str) -> None:
    """Load `pytorch_lora_weights.safetensors` written by `save_lora_weights` back into the active adapter."""
    state = load_file(os.path.join(checkpoint_dir, LORA_WEIGHTS_NAME))
    prefix = f"{denoiser_name}."
    state = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
    result = set_peft_model_state_dict(denoiser, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{checkpoint_dir} holds LoRA weights this model has no place for: {unexpected[:5]}...")


def load_full_denoiser(denoiser: torch.nn.Module, checkpoint_dir: str, denoiser_name: str) -> None:
    """Load a full denoiser saved by `save_pretrained` under `checkpoint_dir/<denoiser_name>`."""
    folder = os.path.join(checkpoint_dir, denoiser_name)
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    state = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    denoiser.load_state_dict(state, strict=True)
