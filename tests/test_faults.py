"""Faults during training: a reward that raises, a disk that fills up while saving. Nothing saved is lost or left
half-written, and the error says what failed. (Corrupt rows, NaN rewards and killed runs: see docs/faults.md.)"""

import errno

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import lora, make_trainer
from transformers.trainer_utils import get_last_checkpoint

from ddrl_trl.testing import tiny_sd_pipeline


def checkpoint_trainer(tmp_path, dataset, **kw):
    return make_trainer(tmp_path, dataset, peft_config=lora(), max_steps=3, save_strategy="steps", save_steps=1, **kw)


def assert_loadable(checkpoint):
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(checkpoint))
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()


def test_reward_exception_propagates_with_its_type_and_the_function_named(tmp_path, reference_dataset):
    calls = {"n": 0}

    def flaky_reward(images, prompts, **_):
        calls["n"] += 1
        if calls["n"] == 3:  # construction check, step 1, then step 2 fails
            raise ZeroDivisionError("the reward model divided by zero")
        return images.float().flatten(1).mean(1).tolist()

    trainer = checkpoint_trainer(tmp_path, reference_dataset, reward=flaky_reward)
    with pytest.raises(ZeroDivisionError, match="divided by zero") as info:
        trainer.train()
    assert any("reward function 'flaky_reward'" in note for note in info.value.__notes__)
    assert get_last_checkpoint(str(tmp_path / "out")).endswith("checkpoint-1")
    assert_loadable(tmp_path / "out" / "checkpoint-1")


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, reference_dataset):
    trainer = checkpoint_trainer(tmp_path, reference_dataset)
    original = trainer._save_optimizer_and_scheduler

    def full_disk(output_dir):
        if trainer.state.global_step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(output_dir)

    trainer._save_optimizer_and_scheduler = full_disk
    with pytest.raises(OSError, match="No space left on device"):
        trainer.train()
    out = tmp_path / "out"
    assert not (out / "checkpoint-2").exists()
    assert get_last_checkpoint(str(out)).endswith("checkpoint-1")
    assert_loadable(out / "checkpoint-1")
    # with space again, the run resumes from checkpoint-1 and finishes; the leftover staging folder is cleared
    trainer = checkpoint_trainer(tmp_path, reference_dataset)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 3 and not (out / ".tmp-checkpoint").exists()


def test_disk_full_during_save_model_leaves_the_saved_weights_untouched(tmp_path, reference_dataset, monkeypatch):
    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), max_steps=1)
    trainer.train()
    trainer.save_model()
    weights = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    before = load_file(weights)
    for p in trainer.model.parameters():  # different weights that must not half-replace the saved ones
        if p.requires_grad:
            p.data.add_(1.0)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.save_model()
    after = load_file(weights)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]
