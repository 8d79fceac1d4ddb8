"""DDRLTrainer end to end on tiny offline Stable Diffusion pipelines."""

import math
import os

import pytest
import torch
from conftest import brightness_reward
from diffusers import DDIMScheduler, UNet2DConditionModel
from helpers import assert_reloads_to_trained_outputs, lora, make_trainer
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback

from ddrl_trl.core import group_advantages
from ddrl_trl.step.policy import Conditions
from ddrl_trl.step.rollout import SeededNoise, stable_seed
from ddrl_trl.testing import tiny_sd_pipeline, tiny_sdxl_pipeline


def test_on_policy_ratio_is_one_in_float32(tmp_path, reference_dataset, observe):
    ratios = []
    observe("step_terms", lambda terms, **_: ratios.append(terms.ratio))
    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), data_beta=0.1, max_steps=1)
    trainer.train()
    assert len(ratios) == 3  # steps 0, 1, 2 of 4 (the last is never trained)
    deviation = torch.stack(ratios).sub(1).abs().max().item()
    assert deviation < 1e-5, deviation
    assert trainer.state.log_history[0]["clip_fraction"] == 0.0


@pytest.mark.parametrize("data_beta", [0.0, 0.5])
def test_gradient_equals_grpo_plus_data_term_computed_separately(tmp_path, reference_dataset, data_beta):
    """data_beta=0 (and kl_beta=0) is plain GRPO; otherwise the gradient adds data_beta × ∇(diffusion loss on x̃0
    noised with the rollout's initial noise to each trained step's timestep), here computed in separate passes."""
    trainer = make_trainer(
        tmp_path, reference_dataset, data_beta=data_beta, num_inference_steps=4, train_step_stride=2
    )
    model, adapter, sampler = trainer.model, trainer.adapter, trainer.sampler
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    seed = stable_seed(trainer.args.seed, 0, 0)  # (seed, optimiser step 0, micro-step 0)
    trainer.training_step(model, batch)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    cond = adapter.encode_prompts(batch["prompts"][::2])
    cond_rep = {k: v.repeat_interleave(2, 0) for k, v in cond.items()}
    noise_source = SeededNoise(seed, torch.device("cpu"), num_generations=2)
    rollout = trainer.policy.rollout(Conditions(cond_rep), noise_source, range(4))
    rewards = torch.tensor(brightness_reward(rollout.images, batch["prompts"]))
    adv = group_advantages(rewards, 2)
    noise = rollout.states[::2, 0]
    ref = batch["ref_latents"][::2] if data_beta else None  # data_beta=0 reads (and encodes) no references
    scheduler = DDIMScheduler.from_config(trainer.pipeline.scheduler.config)
    steps = [0, 2]
    total = 0.0
    for j in steps:
        t = sampler.timesteps[j]
        out = model(rollout.states[:, j], t, encoder_hidden_states=cond_rep["encoder_hidden_states"]).sample
        log_prob, _ = sampler.log_prob(out, j, rollout.states[:, j], rollout.states[:, j + 1])
        total = total + (-(adv * torch.exp(log_prob - rollout.log_probs[:, j]))).mean() / len(steps)
        if data_beta:
            noisy = scheduler.add_noise(ref, noise, t.expand(2))
            pred = model(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
            total = total + data_beta * torch.nn.functional.mse_loss(pred, noise) / len(steps)
    total.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_lora_training_logs_metrics_saves_and_reloads_in_plain_diffusers(tmp_path, reference_dataset):
    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), eval_dataset=reference_dataset)
    before = trainer.evaluate()
    assert before["eval_diffusion_loss_ratio"] == pytest.approx(1.0, abs=1e-6)
    trainer.train()
    logs = trainer.state.log_history[0]
    for key in [
        "reward",
        "reward_std",
        "rewards/brightness_reward/mean",
        "loss/policy",
        "loss/data",
        "loss/kl",
        "ratio/mean",
        "clip_fraction",
        "grad_norm",
    ]:
        assert key in logs, key
    after = trainer.evaluate()
    assert after["eval_diffusion_loss"] != before["eval_diffusion_loss"]
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]

    plain = tiny_sd_pipeline()
    plain.load_lora_weights(str(out))
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    cond = torch.randn(2, 16, 32)
    with torch.no_grad():
        expected = trainer.adapter.denoiser(latents, t, encoder_hidden_states=cond).sample
        reloaded = plain.unet(latents, t, encoder_hidden_states=cond).sample
        base = tiny_sd_pipeline().unet(latents, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(reloaded, expected, rtol=1e-5, atol=1e-6)
    assert (reloaded - base).abs().max() > 1e-6  # the adapter did change the model


@pytest.mark.parametrize("builder", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_full_fine_tuning_with_guided_rollouts_saves_denoiser_in_diffusers_format(
    tmp_path, reference_dataset, builder
):
    trainer = make_trainer(
        tmp_path, reference_dataset, pipeline=builder(), max_steps=1, eval_dataset=reference_dataset, cfg_scale=3.0
    )
    trainer.train()
    assert trainer.evaluate()["eval_diffusion_loss_ratio"] != 1.0
    trainer.save_model()
    reloaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "out" / "unet"))
    for (name, a), b in zip(trainer.model.state_dict().items(), reloaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_same_seed_gives_identical_training(tmp_path, reference_dataset):
    weights = []
    for run in range(2):
        trainer = make_trainer(tmp_path / str(run), reference_dataset, peft_config=lora())
        trainer.train()
        weights.append([p.detach().clone() for p in trainer.model.parameters() if p.requires_grad])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kl_to_base_with_lora_starts_at_zero(tmp_path, reference_dataset):
    trainer = make_trainer(
        tmp_path, reference_dataset, peft_config=LoraConfig(r=4, lora_alpha=4), kl_beta=0.1, max_steps=2
    )
    trainer.train()
    first, second = trainer.state.log_history[0], trainer.state.log_history[1]
    assert first["loss/kl"] == 0.0  # LoRA starts as the identity: policy == base
    assert second["loss/kl"] > 0.0


def test_kl_with_full_fine_tuning_keeps_a_frozen_copy(tmp_path, reference_dataset):
    trainer = make_trainer(tmp_path, reference_dataset, kl_beta=0.1, max_steps=2)
    frozen = trainer.reference.frozen_copy
    assert frozen is not None and not any(p.requires_grad for p in frozen.parameters())
    trainer.train()
    assert trainer.state.log_history[1]["loss/kl"] > 0.0


@pytest.mark.parametrize(
    "options",
    [
        dict(data_noise="random"),
        dict(data_timesteps="random"),
        dict(data_on_first_step_only=True),
        dict(same_noise_within_group=True),
        dict(exp_advantage=True, scale_rewards="batch"),
    ],
)
def test_data_term_and_rollout_options_train(tmp_path, reference_dataset, options):
    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), max_steps=1, **options)
    trainer.train()
    assert trainer.state.log_history[0]["loss/data"] > 0


@pytest.mark.parametrize("patterns", [False, True], ids=["alpha-16-r-4", "rank-and-alpha-patterns"])
@pytest.mark.parametrize(
    "builder",
    [lambda: tiny_sd_pipeline(prediction_type="v_prediction"), tiny_sdxl_pipeline],
    ids=["sd-v-prediction", "sdxl"],
)
def test_lora_of_any_shape_reloads_in_plain_diffusers_at_its_trained_strength(
    tmp_path, reference_dataset, builder, patterns
):
    """Without the LoRA config in the file, `load_lora_weights` assumes alpha = r and no patterns: an r=4/alpha=16
    LoRA came back at a quarter of its strength. The patterned LoRAs train with guided rollouts."""
    trainer = make_trainer(
        tmp_path,
        reference_dataset,
        peft_config=lora(patterns),
        pipeline=builder(),
        max_steps=1,
        learning_rate=1e-2,
        cfg_scale=3.0 if patterns else 1.0,
    )
    trainer.train()
    trainer.save_model()
    plain = builder()
    plain.load_lora_weights(str(tmp_path / "out"))
    x = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(3))
    cond = trainer.adapter.encode_prompts(["a red cat", "a blue dog"])
    assert_reloads_to_trained_outputs(trainer, plain, (x, torch.tensor([900, 400]), cond))


def test_invalid_rewards_are_excluded_and_counted(tmp_path, reference_dataset):
    calls = {"n": 0}

    def flaky(images, prompts, **kwargs):
        calls["n"] += 1
        scores = images.mean(dim=(1, 2, 3)).tolist()
        return scores if calls["n"] == 1 else [None, float("nan")] + scores[2:]

    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), reward=flaky, max_steps=1)
    trainer.train()
    assert trainer.state.log_history[0]["rewards/flaky/invalid"] == 2.0


def test_dataset_columns_reach_rewards_and_callbacks_run(tmp_path, reference_dataset):
    seen, steps = [], []

    def label_reward(images, prompts, label, **kwargs):
        seen.append(list(label))
        return [float(x) for x in label]

    class Counter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), reward=label_reward)
    trainer.add_callback(Counter())
    trainer.train()
    assert steps == [1, 2]
    assert all(len(labels) == 4 and labels[0] == labels[1] and labels[2] == labels[3] for labels in seen[1:])


def test_checkpoints_and_tensorboard_images(tmp_path, reference_dataset):
    trainer = make_trainer(
        tmp_path,
        reference_dataset,
        peft_config=lora(),
        save_strategy="steps",
        save_steps=1,
        report_to="tensorboard",
        log_sample_images_steps=2,
        num_sample_images=4,
        validation_prompts=["a red cat", "a blue dog"],  # sampled at every step: the "validation" grid
        validation_images_per_prompt=2,
        validation_steps=1,
    )
    trainer.train()
    # a validation inside a step (on_step_end) does not cancel that step's own training log
    for key in ("loss", "reward", "grad_norm", "learning_rate"):
        assert [h["step"] for h in trainer.state.log_history if key in h] == [1, 2], key
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dirs = [os.path.join(dp) for dp, _, files in os.walk(out / "runs") if any("tfevents" in f for f in files)]
    images, scalars = set(), {}
    for run_dir in run_dirs:
        acc = EventAccumulator(run_dir, size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        images.update(acc.Tags()["images"])
        if "samples" in acc.Tags()["images"]:
            sample_steps = [event.step for event in acc.Images("samples")]
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(event.step for event in acc.Scalars(tag))
    assert {"samples", "validation"} <= images
    assert sample_steps == [2]  # every 2 steps: step 2's rollouts, at the step whose training log has their rewards
    assert scalars["train/loss"] == scalars["train/reward"] == [1, 2]  # the trackers got every training log
    assert scalars["eval/diversity"] == [1, 2]


def test_gradient_checkpointing_uses_the_diffusers_switch(tmp_path, reference_dataset):
    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora(), max_steps=1, gradient_checkpointing=True)
    assert trainer.model.is_gradient_checkpointing
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.model.is_gradient_checkpointing
    assert trainer.args.gradient_checkpointing  # the user's arguments are left as given
    # torch.utils.checkpoint's own arguments pass through (TRL users set use_reentrant); layer selection cannot
    kwargs = {"use_reentrant": False}
    trainer = make_trainer(
        tmp_path / "kw",
        reference_dataset,
        peft_config=lora(),
        max_steps=1,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs=kwargs,
    )
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.model.is_gradient_checkpointing
    with pytest.raises(ValueError, match=r"gradient_checkpointing_kwargs \['every_n_layers'\] are not supported"):
        make_trainer(
            tmp_path / "bad",
            reference_dataset,
            peft_config=lora(),
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"every_n_layers": 2},
        )


@pytest.mark.parametrize("use_lora", [True, False])
def test_resume_from_checkpoint_continues_like_an_uninterrupted_run(tmp_path, reference_dataset, use_lora):
    """Same weights, and the same held-out loss ratio to the base model: full fine-tuning keeps no base copy, so the
    base loss must be measured at the resumed train() as at the first (before Trainer loads the checkpoint). The
    LoRA runs roll out with guidance and the data term's prompt dropout, whose draws must repeat after resuming."""

    def run(name, **kw):
        trainer = make_trainer(
            tmp_path / name,
            reference_dataset,
            peft_config=lora() if use_lora else None,
            eval_dataset=reference_dataset,
            max_steps=4,
            cfg_scale=2.0 if use_lora else 1.0,
            data_prompt_dropout=0.5 if use_lora else None,
            **kw,
        )
        return trainer

    straight = run("straight")
    straight.train()
    run("saved", save_strategy="steps", save_steps=2).train()
    resumed = run("resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "saved" / "out" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    expected, measured = straight.evaluate(), resumed.evaluate()
    assert expected["eval_diffusion_loss_ratio"] != 1.0  # training changed the held-out loss
    for key, value in expected.items():
        assert measured[key] == pytest.approx(value, rel=1e-5), key


def test_full_fine_tuning_keeps_float32_master_weights_and_lora_base_follows_bf16(tmp_path, reference_dataset):
    full = make_trainer(
        tmp_path / "full",
        reference_dataset,
        pipeline=tiny_sd_pipeline().to(dtype=torch.bfloat16),
        eval_dataset=reference_dataset,
        bf16=True,
        use_cpu=True,
        max_steps=1,
    )
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
    assert full.pipeline.vae.dtype == torch.bfloat16
    # The base model's held-out loss is measured at train(), before accelerate's prepare(): the trainer's own autocast
    # lets the float32 denoiser read the bf16 text encoder's conditioning there.
    full.train()
    assert full.state.log_history[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-2)  # bf16 forward, float32 ratio
    assert math.isfinite(full.evaluate()["eval_diffusion_loss_ratio"])

    lora_trainer = make_trainer(tmp_path / "lora", reference_dataset, peft_config=lora(), bf16=True, use_cpu=True)
    trainable = {p.dtype for p in lora_trainer.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in lora_trainer.model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_saving_from_a_gathered_state_dict_matches_the_normal_save(tmp_path, reference_dataset, use_lora):
    """Under FSDP / DeepSpeed ZeRO-3, Trainer.save_model hands `_save` the gathered weights: same files, same
    weights."""
    trainer = make_trainer(tmp_path, reference_dataset, peft_config=lora() if use_lora else None, max_steps=1)
    trainer.train()
    trainer._save(str(tmp_path / "normal"))
    trainer._save(str(tmp_path / "gathered"), state_dict=trainer.model.state_dict())
    name = "pytorch_lora_weights.safetensors" if use_lora else "unet/diffusion_pytorch_model.safetensors"
    normal, gathered = load_file(tmp_path / "normal" / name), load_file(tmp_path / "gathered" / name)
    assert normal.keys() == gathered.keys()
    assert all(torch.equal(normal[k], gathered[k]) for k in normal)
    if not use_lora:
        reloaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "gathered" / "unet"))
        assert all(
            torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), trainer.model.state_dict().values())
        )


@pytest.mark.parametrize(
    "name, kind",
    [("multi_gpu", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"), ("deepspeed_zero3", "DEEPSPEED")],
)
def test_shipped_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(
        os.path.join(os.path.dirname(__file__), "..", "ddrl_trl", "accelerate_configs", f"{name}.yaml")
    )
    assert config.distributed_type.value == kind and config.num_processes == 8


def test_lora_initialisation_depends_on_args_seed_only(tmp_path, reference_dataset):
    """The adapter's random init must not depend on whatever the global RNG did before the trainer was built."""
    torch.manual_seed(123)
    first = make_trainer(tmp_path / "a", reference_dataset, peft_config=LoraConfig(r=4, lora_alpha=4))
    torch.manual_seed(456)
    torch.randn(1000)
    second = make_trainer(tmp_path / "b", reference_dataset, peft_config=LoraConfig(r=4, lora_alpha=4))
    a = {k: v for k, v in first.model.state_dict().items() if "lora_A" in k}
    b = {k: v for k, v in second.model.state_dict().items() if "lora_A" in k}
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    third = make_trainer(tmp_path / "c", reference_dataset, peft_config=LoraConfig(r=4, lora_alpha=4), seed=1)
    assert not torch.equal(next(iter(a.values())), third.model.state_dict()[next(iter(a))])
