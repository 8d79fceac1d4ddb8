"""Helpers shared by the tests: a tiny DDRL trainer and its arguments, a LoRA config, checks of reloaded weights, a
run driven to hack on purpose, and recording what a module's function returned."""

import torch
from conftest import brightness_reward
from peft import LoraConfig

from ddrl_trl import DDRLConfig, DDRLTrainer
from ddrl_trl.step.policy import Conditions
from ddrl_trl.testing import tiny_sd_pipeline

#: The held-out loss ratio at which `hacking_trainer`'s runs count as hacked.
HACKING_THRESHOLD = 1.15


def make_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        num_generations=2,
        per_device_train_batch_size=4,
        num_inference_steps=4,
        train_step_stride=1,
        max_steps=2,
        learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=1,
        report_to="none",
        log_sample_images_steps=0,
        save_strategy="no",
        seed=0,
        per_device_eval_batch_size=4,
        dataloader_pin_memory=False,
    )
    values.update(overrides)
    return DDRLConfig(**values)


def lora(patterns: bool = False) -> LoraConfig:
    """A LoRA with alpha ≠ r, as users pass them (TRL's ModelConfig: r 16 / alpha 32; train_sd3.py: 32 / 64);
    `patterns` adds per-module ranks and alphas (peft's rank_pattern / alpha_pattern)."""
    extra = dict(rank_pattern={"to_q": 8}, alpha_pattern={"to_v": 2}) if patterns else {}
    return LoraConfig(r=4, lora_alpha=16, init_lora_weights="gaussian", **extra)


def assert_reloads_to_trained_outputs(trainer, plain_pipeline, inputs) -> None:
    """`plain_pipeline` (a fresh base pipeline after the user's reload) gives the trained denoiser's outputs on
    `inputs` = (latents, timesteps, conditioning), and they differ from the base model's."""
    from ddrl_trl.adapters import get_adapter

    reloaded_adapter = get_adapter(plain_pipeline)
    reloaded_adapter.configure(trainer.args)
    with torch.no_grad():
        trained = trainer.adapter.predict(*inputs)
        reloaded = reloaded_adapter.predict(*inputs)
    latents, timesteps, cond = inputs
    base = trainer.reference.forward(latents, timesteps, Conditions(cond)).policy  # the LoRA switched off
    assert (trained - base).abs().max() > 1e-4  # the training did change the model
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-6)


def make_trainer(
    tmp_path,
    dataset,
    peft_config=None,
    pipeline=None,
    reward=brightness_reward,
    eval_dataset=None,
    callbacks=None,
    eval_reward_funcs=None,
    **kw,
):
    return DDRLTrainer(
        model=pipeline if pipeline is not None else tiny_sd_pipeline(),
        reward_funcs=reward,
        args=make_args(tmp_path, **kw),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        callbacks=callbacks,
        eval_reward_funcs=eval_reward_funcs,
    )


def hacking_trainer(tmp_path, reference_dataset, monitor, **kw):
    """Full fine-tuning with data_beta=0 and a large learning rate on brightness: the held-out loss ratio climbs past
    HACKING_THRESHOLD (1.15) within a few steps (1.00, 1.04, 1.03, 1.10, 1.18, ... on this seed)."""
    return make_trainer(
        tmp_path,
        reference_dataset,
        eval_dataset=reference_dataset,
        data_beta=0.0,
        learning_rate=1e-2,
        max_steps=8,
        callbacks=[monitor],
        **kw,
    )
