"""Rectified-flow families (SD3, FLUX, Wan video) end to end on tiny offline pipelines.

Each family is checked for: the same denoising trajectory as its own diffusers pipeline (schedule, shift, packing,
guidance and timestep scaling all right), the data-term target of diffusers' training recipe, on-policy ratio 1, and a
2-step DDRL training whose weights change and reload through plain diffusers (LoRA and full fine-tuning).
"""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from helpers import lora, make_trainer

from ddrl_trl import DDRLConfig
from ddrl_trl.adapters import FluxAdapter, StableDiffusion3Adapter, WanAdapter, get_adapter
from ddrl_trl.samplers import FlowSDESampler
from ddrl_trl.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_wan_pipeline

PROMPTS = ["a red cat", "a blue dog"]


def tiny_wan22_ti2v_pipeline():
    """Wan 2.2 TI2V's text-to-video path: the same pipeline with per-token timesteps (`expand_timesteps`)."""
    pipe = tiny_wan_pipeline()
    pipe.register_to_config(expand_timesteps=True)
    return pipe


WAN_CALL, WAN_CONFIG = {"num_frames": 9, "guidance_scale": 1.0}, {"resolution": 16, "num_frames": 9}
FAMILIES = {
    # name: (builder, pipeline-call kwargs, DDRLConfig kwargs)
    "sd3": (tiny_sd3_pipeline, {}, {}),
    "flux": (tiny_flux_pipeline, {"guidance_scale": 3.5}, {"resolution": 32}),
    "flux-schnell": (lambda: tiny_flux_pipeline(guidance_embeds=False), {}, {"resolution": 32}),
    "wan": (tiny_wan_pipeline, WAN_CALL, WAN_CONFIG),
    "wan2.2-ti2v": (tiny_wan22_ti2v_pipeline, WAN_CALL, WAN_CONFIG),
}


def configured_adapter(pipe, **config):
    adapter = get_adapter(pipe)
    args = DDRLConfig(output_dir="unused", report_to="none", num_inference_steps=5, **config)
    adapter.configure(args)
    return adapter, args


def pipeline_latents(name, pipe, adapter, x, **call):
    """Run the family's own pipeline from latents `x` and return its final latents, unpacked to (B, C, ...)."""
    size = adapter.resolution
    if name.startswith("flux"):
        packed = FluxPipeline._pack_latents(x, x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        out = pipe(PROMPTS, height=size, width=size, latents=packed, **call).images
        return FluxPipeline._unpack_latents(out, size, size, adapter.vae_scale_factor)
    if name.startswith("wan"):
        return pipe(PROMPTS, height=size, width=size, latents=x, **call).frames
    return pipe(PROMPTS, height=size, width=size, latents=x, guidance_scale=1.0, **call).images


@pytest.mark.parametrize("name", FAMILIES)
def test_noise_free_sampler_retraces_the_pipelines_own_trajectory(name):
    builder, call, config = FAMILIES[name]
    pipe = builder()
    if name.startswith(
        "wan"
    ):  # Wan ships UniPC, a multistep solver; its Euler twin on the same shifted sigmas is comparable
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)
    adapter, args = configured_adapter(pipe, flow_noise_level=1e-9, **config)
    sampler = adapter.make_sampler(args, torch.device("cpu"))
    x = torch.randn(2, *adapter.latent_shape(adapter.resolution), generator=torch.Generator().manual_seed(0))
    expected = pipeline_latents(
        name, pipe, adapter, x, num_inference_steps=5, max_sequence_length=16, output_type="latent", **call
    )
    cond = adapter.encode_prompts(PROMPTS)
    latents = x
    with torch.no_grad():
        for j, t in enumerate(sampler.timesteps):
            latents = sampler.step_mean(adapter.predict(latents, t.expand(2), cond), j, latents)
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)


def test_flux_schedule_is_shifted_by_image_size_and_guidance_reaches_the_transformer():
    pipe = tiny_flux_pipeline()
    small, args = configured_adapter(pipe, resolution=32)
    large, _ = configured_adapter(pipe, resolution=64)
    assert large.timestep_shift_mu() > small.timestep_shift_mu()
    assert (large.make_sampler(args, "cpu").sigmas[1:-1] > small.make_sampler(args, "cpu").sigmas[1:-1]).all()
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 700.0)
    cond = small.encode_prompts(PROMPTS)
    with torch.no_grad():
        out_a = small.predict(x, t, cond)
        small.guidance_scale = 1.0
        out_b = small.predict(x, t, cond)
    assert (out_a - out_b).abs().max() > 1e-4


def test_wan_sampler_uses_the_shipped_unipc_flow_sigmas():
    pipe = tiny_wan_pipeline(flow_shift=5.0)
    adapter, args = configured_adapter(pipe, resolution=16, num_frames=9)
    sampler = adapter.make_sampler(args, torch.device("cpu"))
    reference = type(pipe.scheduler).from_config(pipe.scheduler.config)
    reference.set_timesteps(5)
    torch.testing.assert_close(sampler.sigmas, reference.sigmas.float())
    # UniPC starts at 1 − 1e-6: the t ≈ 1 guard keeps the first step's noise finite, as at t = 1
    assert sampler.sigmas[0] < 1 and sampler.stds[0] < 2 * sampler.stds[1]


@pytest.mark.parametrize("name", FAMILIES)
def test_data_term_matches_diffusers_flow_matching_training_recipe(name):
    """x_t, the target and the denoiser call of the data term, against diffusers' flow-matching training scripts:
    sigmas looked up from the scheduler's training timesteps, noisy = (1 − σ) x0 + σ ε, target = ε − x0, and for FLUX
    the packed call with timestep / 1000 and the guidance embedding."""
    builder, _, config = FAMILIES[name]
    pipe = builder()
    adapter, args = configured_adapter(pipe, **config)
    sampler = adapter.make_sampler(args, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, *adapter.latent_shape(adapter.resolution), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    train_scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # the scripts' noise_scheduler_copy
    indices = torch.tensor([10, 500, 990])
    timesteps = train_scheduler.timesteps[indices]
    sigmas = train_scheduler.sigmas[indices].view(-1, *[1] * (x0.ndim - 1))
    script_noisy = (1.0 - sigmas) * x0 + sigmas * noise
    torch.testing.assert_close(sampler.add_noise(x0, noise, timesteps), script_noisy)
    torch.testing.assert_close(sampler.training_target(x0, noise, timesteps), noise - x0)

    cond = adapter.encode_prompts(["a red cat"] * 3)
    with torch.no_grad():
        ours = adapter.predict(script_noisy, timesteps, cond)
        if name.startswith("flux"):
            b, c, h, w = x0.shape
            script = pipe.transformer(
                hidden_states=FluxPipeline._pack_latents(script_noisy, b, c, h, w),
                timestep=timesteps / 1000,
                guidance=torch.full((b,), adapter.guidance_scale) if name == "flux" else None,
                pooled_projections=cond["pooled_projections"],
                encoder_hidden_states=cond["encoder_hidden_states"],
                txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3),
                img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
                return_dict=False,
            )[0]
            script = FluxPipeline._unpack_latents(
                script, h * adapter.vae_scale_factor, w * adapter.vae_scale_factor, adapter.vae_scale_factor
            )
        else:
            script = pipe.transformer(hidden_states=script_noisy, timestep=timesteps, return_dict=False, **cond)[0]
    torch.testing.assert_close(ours, script)


def _dataset(name, reference_dataset, reference_videos):
    return (reference_videos, {}) if name.startswith("wan") else (reference_dataset, {})  # "video": found by name


@pytest.mark.parametrize("kind", ["lora", "lora-patterns", "full"])
@pytest.mark.parametrize("name", FAMILIES)
def test_two_step_ddrl_training_changes_the_denoiser_and_reloads_in_diffusers(
    name, kind, tmp_path, reference_dataset, reference_videos, observe
):
    """LoRAs with alpha ≠ r, and with per-module rank/alpha patterns, reload through plain `load_lora_weights` at
    their trained strength; full fine-tunes through `from_pretrained`. The patterned LoRA and the full fine-tune
    train with classifier-free guided rollouts (FLUX: true CFG), on-policy as the unguided LoRA."""
    builder, _, config = FAMILIES[name]
    guidance = {} if kind == "lora" else {"cfg_scale": 2.0}
    dataset, columns = _dataset(name, reference_dataset, reference_videos)
    use_lora = kind != "full"
    ratios = []
    observe("step_terms", lambda terms, **_: ratios.append(terms.ratio))
    trainer = make_trainer(
        tmp_path,
        dataset,
        peft_config=lora(patterns=kind == "lora-patterns") if use_lora else None,
        pipeline=builder(),
        max_steps=2,
        max_sequence_length=16,
        **config,
        **columns,
        **guidance,
    )
    assert isinstance(trainer.sampler, FlowSDESampler)
    trainer.train()
    assert torch.stack(ratios).sub(1).abs().max().item() < 1e-5
    assert trainer.state.log_history[0]["loss/data"] > 0
    trainer.save_model()

    plain = builder()
    if use_lora:
        plain.load_lora_weights(str(tmp_path / "out"))
    else:
        plain.transformer = type(plain.transformer).from_pretrained(str(tmp_path / "out" / "transformer"))
    reloaded_adapter, _ = configured_adapter(plain, **config)
    base_adapter, _ = configured_adapter(builder(), **config)
    x = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([900.0, 400.0])
    cond = trainer.adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        trained = trainer.adapter.predict(x, t, cond)
        reloaded = reloaded_adapter.predict(x, t, cond)
        base = base_adapter.predict(x, t, cond)
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-6)
    assert (reloaded - base).abs().max() > 1e-6


def test_adapters_are_picked_by_pipeline_class():
    assert isinstance(get_adapter(tiny_sd3_pipeline()), StableDiffusion3Adapter)
    assert isinstance(get_adapter(tiny_flux_pipeline()), FluxAdapter)
    assert isinstance(get_adapter(tiny_wan_pipeline()), WanAdapter)


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_with_gradient_checkpointing_keeps_float32_log_probs_and_lora(
    name, tmp_path, reference_dataset, reference_videos, observe
):
    builder, _, config = FAMILIES[name]
    dataset, columns = _dataset(name, reference_dataset, reference_videos)
    rollouts = []
    observe("rollout_end", lambda rollout, scores: rollouts.append(rollout))
    trainer = make_trainer(
        tmp_path,
        dataset,
        peft_config=lora(),
        pipeline=builder(),
        max_steps=1,
        bf16=True,
        use_cpu=True,
        gradient_checkpointing=True,
        max_sequence_length=16,
        **config,
        **columns,
    )
    trainer.train()
    denoiser = trainer.adapter.denoiser
    assert denoiser.is_gradient_checkpointing
    assert {p.dtype for p in denoiser.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in denoiser.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert rollouts[0].log_probs.dtype == torch.float32 and rollouts[0].states.dtype == torch.float32
    assert torch.isfinite(rollouts[0].log_probs).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_held_out_loss_ratio_is_one_before_training(name, tmp_path, reference_dataset, reference_videos):
    builder, _, config = FAMILIES[name]
    dataset, columns = _dataset(name, reference_dataset, reference_videos)
    trainer = make_trainer(
        tmp_path,
        dataset,
        peft_config=lora(),
        pipeline=builder(),
        eval_dataset=dataset,
        max_sequence_length=16,
        **config,
        **columns,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_diffusion_loss"] > 0
    assert metrics["eval_diffusion_loss_ratio"] == 1.0  # LoRA B starts at zero: the model is the base
