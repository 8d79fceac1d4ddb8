"""Checkpoint and resume under SIGKILL: 6 steps straight == 3 steps, kill, resume to 6 (weights, optimizer,
scheduler, RNG, data position, EMA); a kill in the middle of writing a checkpoint leaves nothing resume would load."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

SCRIPT = Path(__file__).resolve().parent / "resume_train.py"


def run(out: Path, mode: str) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), mode], env=env, capture_output=True, text=True, timeout=600
    )
    if result.returncode not in (0, -9):
        raise AssertionError(result.stderr[-4000:])
    return result.returncode


def final_weights(out: Path) -> tuple[dict, dict]:
    return load_file(out / "final" / "pytorch_lora_weights.safetensors"), torch.load(out / "raw.pt")


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path):
    assert run(tmp_path / "straight", "straight") == 0
    killed = tmp_path / "killed"
    assert run(killed, "kill-after-save") == -9  # SIGKILL right after checkpoint-3
    assert not (killed / "final").exists() and get_last_checkpoint(str(killed)).endswith("checkpoint-3")
    assert (killed / "checkpoint-3" / "ema_state.pt").is_file()
    assert run(killed, "resume") == 0
    ema_straight, raw_straight = final_weights(tmp_path / "straight")
    ema_resumed, raw_resumed = final_weights(killed)
    assert_identical(raw_straight, raw_resumed)  # weights, optimizer, scheduler, RNG and data position restored
    assert_identical(ema_straight, ema_resumed)  # and the EMA
    # the final save holds the EMA weights, not the raw ones
    lora_b = next(k for k in raw_straight if "lora_B" in k)
    ema_key = next(k for k in ema_straight if k.endswith(lora_b.replace(".default", "")))
    assert not torch.equal(ema_straight[ema_key], raw_straight[lora_b])


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one_as_newest(tmp_path):
    out = tmp_path / "run"
    assert run(out, "kill-mid-save") == -9  # killed inside checkpoint-6's save
    assert not (out / "checkpoint-6").exists()
    assert (out / ".tmp-checkpoint" / "checkpoint-6" / "optimizer.pt").is_file()  # the half-written one, staged
    assert get_last_checkpoint(str(out)).endswith("checkpoint-3")
    assert run(out, "resume") == 0  # resumes from checkpoint-3 and finishes
    assert (out / "checkpoint-6" / "trainer_state.json").is_file() and not (out / ".tmp-checkpoint").exists()
    assert run(tmp_path / "straight", "straight") == 0
    assert_identical(final_weights(tmp_path / "straight")[1], final_weights(out)[1])
