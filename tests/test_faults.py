"""Faults during training: a reward that raises, a disk that fills up while saving. Nothing saved is lost or left
half-written, and the error says what failed. Config values that would train nothing (a fractional count, a
guidance setting that blows up data_beta) are refused up front. (Corrupt rows, NaN rewards and killed runs: see
docs/faults.md.)"""

import errno
import math

import pytest
import torch
from helpers import lora, make_trainer
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from ddrl_trl import DDRLConfig
from ddrl_trl.config import default_data_beta, guidance_amplification
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


def config(**kw):
    return DDRLConfig(output_dir="unused", report_to="none", **kw)


def test_integer_fields_refuse_fractions_and_take_integral_floats():
    """num_iterations=2.5 passed the config and failed only in train(): every field annotated int (DDRL's and
    TrainingArguments') now refuses a non-integer naming the field; 2.0 (YAML) becomes 2."""
    for name in ("num_iterations", "num_generations", "num_inference_steps", "train_step_stride", "max_steps"):
        with pytest.raises(
            ValueError, match=rf"^{name} must be a whole number \(an int; 2\.0 is taken as 2\), got 2\.5"
        ):
            config(**{name: 2.5})
    for name, bad in (("validation_images_per_prompt", "4"), ("validation_steps", 1.5), ("num_generations", True)):
        with pytest.raises(ValueError, match=rf"^{name} must be a whole number"):
            config(**{name: bad})
    with pytest.raises(
        ValueError, match=r"train_step_indices must be a list of whole numbers \(ints\), got \[0, 1\.5\]"
    ):
        config(train_step_indices=[0, 1.5])
    args = config(num_iterations=2.0, num_generations=4.0, validation_steps=3.0, train_step_indices=[0.0, 2])
    assert (args.num_iterations, args.num_generations, args.validation_steps) == (2, 4, 3)
    assert all(type(v) is int for v in (args.num_iterations, args.num_generations, args.validation_steps))
    assert args.train_step_indices == [0, 2] and all(type(v) is int for v in args.train_step_indices)


def test_guidance_settings_that_would_blow_up_data_beta_are_refused_naming_the_fields():
    """cfg_scale=1e30 resolved data_beta to 9.4e59 (every step then non-finite, the run "succeeding" untrained),
    cfg_scale=1e200 raised a bare OverflowError, data_prompt_dropout=1e-300 gave data_beta 1.5e299: each is a
    ValueError naming the field and its bound; the formulas never overflow."""
    for huge in (1e30, 1e200, 101.0):
        with pytest.raises(ValueError, match=r"^cfg_scale must be ≤ 100, got .*Set the guidance scale you sample"):
            config(cfg_scale=huge)
    with pytest.raises(
        ValueError, match=r"^data_prompt_dropout=1e-300 under guidance \(cfg_scale=2\) must be 0 or ≥ 0\.01"
    ):
        config(cfg_scale=2.0, data_prompt_dropout=1e-300)
    with pytest.raises(
        ValueError,
        match=r"^cfg_scale=100 with data_prompt_dropout=0\.999 resolves the default data_beta to 1\.5e\+06, above its "
        r"maximum 1e\+06",
    ):
        config(cfg_scale=100.0, data_prompt_dropout=0.999)
    with pytest.raises(ValueError, match=r"^data_beta must be ≤ 1e\+06, got 1e\+07"):
        config(data_beta=1e7)
    assert config(cfg_scale=100.0).data_beta == pytest.approx(0.15 * (100**2 / 0.8 + 99**2 / 0.2))  # 9226: allowed
    assert config(cfg_scale=2.0, data_prompt_dropout=0.01).data_beta == pytest.approx(0.15 * (4 / 0.99 + 1 / 0.01))
    with pytest.warns(UserWarning, match="never trains the unconditional branch"):  # 0 stays allowed, with its warning
        assert config(cfg_scale=2.0, data_prompt_dropout=0.0).data_prompt_dropout == 0.0
    assert config(data_prompt_dropout=1e-300).data_beta == 0.3  # unguided: no amplification, no bound
    for args in ((1e200, 0.2), (2.0, 1e-320), (math.nan, 0.2), (math.inf, 0.2)):
        with pytest.raises(ValueError, match=r"overflows|must be a finite number"):
            guidance_amplification(*args)
    with pytest.raises(ValueError, match="overflows"):
        default_data_beta(1e200)
