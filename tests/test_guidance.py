"""Classifier-free guidance in rollouts: the guided policy retraces each family's guided pipeline, its log-probs are
exact (ratio 1), training's one joint forward equals separate passes, the data term's prompt dropout is seeded per
group, and settings that cannot work are refused with the fix."""

import pytest
import torch
from conftest import brightness_reward
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline
from helpers import lora, make_args, make_trainer
from peft import LoraConfig
from transformers import HfArgumentParser

from ddrl_trl import DDRLConfig
from ddrl_trl.adapters import StableDiffusionAdapter, get_adapter
from ddrl_trl.config import default_data_beta, guidance_amplification
from ddrl_trl.core import group_advantages
from ddrl_trl.step.data_term import DataTermBatch
from ddrl_trl.step.groups import GroupLayout
from ddrl_trl.step.policy import Conditions, Policy, UnconditionalPrompts, combine_guidance
from ddrl_trl.step.rollout import SeededNoise, stable_seed
from ddrl_trl.testing import (
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    tiny_wan_pipeline,
)

PROMPTS = ["a red cat", "a blue dog"]
FAMILIES = {
    # name: (builder, DDRLConfig kwargs); the pipeline is called with `adapter.pipeline_call_kwargs` alone
    "sd": (tiny_sd_pipeline, {"eta": 1e-9}),
    "sdxl": (tiny_sdxl_pipeline, {"eta": 1e-9}),
    "sd3": (tiny_sd3_pipeline, {"flow_noise_level": 1e-9, "max_sequence_length": 16}),
    "flux": (tiny_flux_pipeline, {"flow_noise_level": 1e-9, "resolution": 32, "max_sequence_length": 16}),
    "wan": (
        tiny_wan_pipeline,
        {"flow_noise_level": 1e-9, "resolution": 16, "num_frames": 9, "max_sequence_length": 16},
    ),
}


def test_guided_output_is_uncond_plus_scale_times_difference():
    cond, uncond = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(combine_guidance(cond, uncond, 4.0), torch.tensor([9.0, -7.0]))
    assert combine_guidance(cond.bfloat16(), uncond.bfloat16(), 2.0).dtype == torch.float32


@pytest.mark.parametrize("negative_prompt", [None, "a blurry photo"], ids=["default-negative", "negative-prompt"])
@pytest.mark.parametrize("name", FAMILIES)
def test_noise_free_guided_sampler_retraces_the_guided_pipeline(name, negative_prompt):
    """With the noise level → 0 the guided policy's steps are the pipeline's own guided sampling, called with
    `adapter.pipeline_call_kwargs` (SD/SDXL/SD3/Wan `guidance_scale`, FLUX `true_cfg_scale`; SDXL's zero
    embeddings for no negative prompt)."""
    builder, config = FAMILIES[name]
    pipe = builder()
    if name == "wan":  # Wan ships UniPC, a multistep solver; its Euler twin on the same shifted sigmas is comparable
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)
    args = DDRLConfig(
        output_dir="unused", report_to="none", num_inference_steps=5, cfg_scale=3.0, negative_prompt=negative_prompt,
        **config,
    )  # fmt: skip
    adapter = get_adapter(pipe)
    adapter.configure(args)
    sampler = adapter.make_sampler(args, torch.device("cpu"))
    x = torch.randn(2, *adapter.latent_shape(adapter.resolution), generator=torch.Generator().manual_seed(0))

    kwargs = {**adapter.pipeline_call_kwargs(args, len(PROMPTS)), "output_type": "latent"}
    assert kwargs[adapter.cfg_call_argument] == 3.0
    if name == "flux":
        size = adapter.resolution
        packed = FluxPipeline._pack_latents(x, *x.shape)
        out = pipe(PROMPTS, latents=packed, **kwargs).images
        expected = FluxPipeline._unpack_latents(out, size, size, adapter.vae_scale_factor)
    else:
        out = pipe(PROMPTS, latents=x, **kwargs)
        expected = out.frames if name == "wan" else out.images

    unconditional = UnconditionalPrompts(adapter, negative_prompt)
    policy = Policy(adapter, sampler, x.shape[1:], cfg_scale=args.cfg_scale, unconditional=unconditional)
    conditions = policy.conditioning(PROMPTS)
    latents = x
    with torch.no_grad():
        for j, t in enumerate(sampler.timesteps):
            output = policy.forward(latents, t.expand(2), conditions).policy
            latents = sampler.step_mean(output, j, latents)
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)


def test_sdxl_unconditional_branch_is_zeros_without_a_negative_prompt():
    adapter = get_adapter(tiny_sdxl_pipeline())
    adapter.resolution = adapter.default_resolution
    zeros = adapter.encode_unconditional(None, 2)
    assert not zeros["encoder_hidden_states"].any() and not zeros["text_embeds"].any()
    torch.testing.assert_close(zeros["time_ids"], adapter.encode_prompts(PROMPTS)["time_ids"])
    empty = adapter.encode_unconditional(["", ""], 2)
    assert empty["encoder_hidden_states"].abs().sum() > 0  # an explicit "" is encoded, as diffusers does


def test_negative_prompt_column_reaches_the_unconditional_branch():
    adapter = get_adapter(tiny_sd_pipeline())
    columns = {"negative": ["a red cat", "", "a blue dog"]}
    got = UnconditionalPrompts(adapter, None, "negative").for_rows(columns, [2, 0])
    expected = adapter.encode_prompts(["a blue dog", "a red cat"])
    torch.testing.assert_close(got, expected)
    fixed = UnconditionalPrompts(adapter, "a blue dog", None).for_rows(columns, [0, 1, 2])
    torch.testing.assert_close(fixed["encoder_hidden_states"], expected["encoder_hidden_states"][:1].expand(3, -1, -1))


def test_on_policy_ratio_is_one_in_float32_under_guidance(tmp_path, reference_dataset, observe):
    ratios = []
    observe("step_terms", lambda terms, **_: ratios.append(terms.ratio))
    trainer = make_trainer(
        tmp_path, reference_dataset, peft_config=lora(), data_beta=0.1, cfg_scale=4.0, negative_prompt="a green bird"
    )
    trainer.train()
    assert len(ratios) == 6  # 2 steps × steps 0, 1, 2 of 4
    assert torch.stack(ratios).sub(1).abs().max().item() < 1e-5


@pytest.mark.parametrize("data_beta", [0.0, 0.5])
def test_guided_gradient_equals_separate_passes(tmp_path, reference_dataset, data_beta):
    """The one joint forward per trained step ([states; states; noised references] with [prompts; negatives;
    prompts or the null prompt]) gives the gradient of the same loss computed branch by branch in separate passes;
    data_beta = 0 is plain guided GRPO."""
    scale, negative, dropout = 3.0, "a green bird", 0.5
    trainer = make_trainer(
        tmp_path,
        reference_dataset,
        data_beta=data_beta,
        num_inference_steps=4,
        train_step_stride=2,
        cfg_scale=scale,
        negative_prompt=negative,
        data_prompt_dropout=dropout,
    )
    model, adapter, sampler = trainer.model, trainer.adapter, trainer.sampler
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    seed = stable_seed(trainer.args.seed, 0, 0)
    trainer.training_step(model, batch)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    def unet(x, t, embeds):
        return model(x, t, encoder_hidden_states=embeds).sample

    cond = adapter.encode_prompts(batch["prompts"][::2])["encoder_hidden_states"]
    uncond = adapter.encode_prompts([negative, negative])["encoder_hidden_states"]
    null = adapter.encode_prompts(["", ""])["encoder_hidden_states"]  # prompt dropout: never the negative prompt
    cond_rows, uncond_rows = cond.repeat_interleave(2, 0), uncond.repeat_interleave(2, 0)
    noise_source = SeededNoise(seed, torch.device("cpu"), num_generations=2)
    conditions = Conditions({"encoder_hidden_states": cond_rows}, {"encoder_hidden_states": uncond_rows})
    rollout = trainer.policy.rollout(conditions, noise_source, range(4))
    adv = group_advantages(torch.tensor(brightness_reward(rollout.images, batch["prompts"])), 2)
    noise = rollout.states[::2, 0]
    ref = batch["ref_latents"][::2] if data_beta else None  # data_beta=0 reads (and encodes) no references
    scheduler = DDIMScheduler.from_config(trainer.pipeline.scheduler.config)
    steps, drops = [0, 2], []
    total = 0.0
    for position, j in enumerate(steps):
        t, x = sampler.timesteps[j], rollout.states[:, j]
        guided = unet(x, t, uncond_rows) + scale * (unet(x, t, cond_rows) - unet(x, t, uncond_rows))
        log_prob, _ = sampler.log_prob(guided, j, x, rollout.states[:, j + 1])
        total = total + (-(adv * torch.exp(log_prob - rollout.log_probs[:, j]))).mean() / len(steps)
        if data_beta:
            # group g is trained unconditionally when its seeded uniform draw falls below the dropout
            u = [torch.rand(1, generator=noise_source.generator(f"data-drop{position}", g)).item() for g in (0, 1)]
            drop = torch.tensor([v < dropout for v in u])
            drops.extend(drop.tolist())
            embeds = torch.where(drop.view(-1, 1, 1), null, cond)
            pred = unet(scheduler.add_noise(ref, noise, t.expand(2)), t, embeds)
            total = total + data_beta * torch.nn.functional.mse_loss(pred, noise) / len(steps)
    total.backward()
    if data_beta:
        assert True in drops and False in drops  # this seed exercises both branches of the dropout
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_prompt_dropout_draws_do_not_depend_on_the_process_layout(tmp_path):
    """A group's dropout draw is a function of (batch seed, trained step, global group): the same whether one
    process holds all groups or two split them, group 1 spanning both (also what makes resume exact)."""
    args = make_args(tmp_path, cfg_scale=2.0, data_prompt_dropout=0.5)
    noise = SeededNoise(1234, torch.device("cpu"), num_generations=4)

    def draws(rows, process, processes):
        layout = GroupLayout(rows, 4, process, processes)
        cond = {"e": torch.zeros(len(layout.groups), 1)}
        data = DataTermBatch.build(args, torch.zeros(len(layout.groups), 1), cond, layout, noise, cond["e"], cond)
        return {g: [bool(data.dropped(p)[i]) for p in range(16)] for i, g in enumerate(layout.groups)}

    single, first, second = draws(12, 0, 1), draws(6, 0, 2), draws(6, 1, 2)
    assert list(first) == [0, 1] and list(second) == [1, 2]  # 3 groups of 4 rows over 2 × 6 rows
    assert {**first, **second} == single and first[1] == second[1]
    every = [d for per_group in single.values() for d in per_group]
    assert 0.25 < sum(every) / len(every) < 0.75


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(cfg_scale=0.0), "cfg_scale must be ≥ 1"),
        (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number"),
        (dict(cfg_scale=2.0, negative_prompt="x", negative_prompt_column="neg"), "not both"),
        (dict(cfg_scale=2.0, data_prompt_dropout=1.0), r"data_prompt_dropout must be in \[0, 1\)"),
        (dict(negative_prompt="blurry"), "guidance is off"),
    ],
)
def test_invalid_guidance_settings_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **options)


def test_dropout_default_follows_guidance(tmp_path):
    assert make_args(tmp_path).resolved_data_prompt_dropout == 0.0
    assert make_args(tmp_path, cfg_scale=2.0).resolved_data_prompt_dropout == 0.2
    assert make_args(tmp_path, cfg_scale=2.0, data_prompt_dropout=0.0).resolved_data_prompt_dropout == 0.0
    assert make_args(tmp_path, data_prompt_dropout=0.1).resolved_data_prompt_dropout == 0.1  # unguided, explicit
    assert make_args(tmp_path, cfg_scale=2.0, data_beta=0.0).resolved_data_prompt_dropout == 0.0  # no data term


class _NoUncondAdapter(StableDiffusionAdapter):
    supports_cfg = False


def test_family_without_unconditional_branch_refuses_guidance(tmp_path):
    pipe = tiny_sd_pipeline()
    adapter = _NoUncondAdapter(pipe)
    for options in (dict(cfg_scale=2.0), dict(data_prompt_dropout=0.1)):
        with pytest.raises(ValueError, match="has no unconditional branch.*cfg_scale=1.0 and data_prompt_dropout=0"):
            adapter.configure(make_args(tmp_path, **options))
    adapter.configure(make_args(tmp_path))  # unguided is fine


def test_negative_prompt_column_is_checked_before_work(tmp_path, reference_dataset):
    with pytest.raises(ValueError, match="negative_prompt_column='neg' is not a column"):
        make_trainer(tmp_path, reference_dataset, cfg_scale=2.0, negative_prompt_column="neg")
    with pytest.raises(ValueError, match="negative_prompt_column='prompt' is the prompt column"):
        make_trainer(tmp_path, reference_dataset, cfg_scale=2.0, negative_prompt_column="prompt")
    bad = reference_dataset.add_column("neg", [None, "", "x", "y", "z", "w"])
    with pytest.raises(ValueError, match="Row 0 .* column 'neg' holds None, not a string"):
        make_trainer(tmp_path, bad, cfg_scale=2.0, negative_prompt_column="neg")


def test_negative_prompt_column_reaches_training(tmp_path, reference_dataset):
    """A column of identical negative prompts trains exactly as the same fixed negative_prompt, another one does
    not: the column's values are what the guidance's unconditional branch reads."""

    def weights(name, dataset, **options):
        trainer = make_trainer(tmp_path / name, dataset, peft_config=lora(), cfg_scale=2.0, max_steps=1, **options)
        trainer.train()
        return [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]

    column = weights("column", reference_dataset.add_column("neg", ["ugly"] * 6), negative_prompt_column="neg")
    fixed = weights("fixed", reference_dataset, negative_prompt="ugly")
    other = weights("other", reference_dataset, negative_prompt="a green bird")
    for a, b in zip(column, fixed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any((a - b).abs().max() > 0 for a, b in zip(column, other))


def test_kl_reference_is_guided_like_the_policy(tmp_path, reference_dataset):
    """With a LoRA the base is the adapter switched off, guided the same way: the first step's KL is exactly 0
    (an unguided reference would differ from the guided policy from the start)."""
    trainer = make_trainer(
        tmp_path, reference_dataset, peft_config=LoraConfig(r=4, lora_alpha=4), kl_beta=0.1, cfg_scale=3.0
    )
    trainer.train()
    assert trainer.state.log_history[0]["loss/kl"] == 0.0
    assert trainer.state.log_history[1]["loss/kl"] > 0.0


def test_guidance_with_a_weak_data_term_warns_with_the_measurement():
    with pytest.warns(
        UserWarning, match=r"data_beta=0.3, under the guided default 1.5 .* 1.0 let the judge slip .* default 1.5 held"
    ):
        DDRLConfig(output_dir="unused", report_to="none", cfg_scale=2.0, data_beta=0.3)
    with pytest.warns(UserWarning, match="data_prompt_dropout=0: the data term never trains the unconditional branch"):
        DDRLConfig(output_dir="unused", report_to="none", cfg_scale=2.0, data_prompt_dropout=0.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DDRLConfig(output_dir="unused", report_to="none", cfg_scale=2.0)  # the default is the guided anchor
        DDRLConfig(output_dir="unused", report_to="none", cfg_scale=2.0, data_beta=1.5)
        DDRLConfig(output_dir="unused", report_to="none", cfg_scale=1.0, data_beta=0.1)
        DDRLConfig(output_dir="unused", report_to="none", cfg_scale=2.0, data_beta=0.0)  # plain guided GRPO: asked for


def test_default_data_beta_scales_with_the_guidance_amplification():
    """None resolves to 0.3 unguided and to 0.15 · F(w, p), F = w²/(1−p) + (w−1)²/p, under guidance (never below
    0.3); a value the user sets is kept."""
    assert guidance_amplification(1.0, 0.0) == 1.0
    assert guidance_amplification(2.0, 0.2) == pytest.approx(4 / 0.8 + 1 / 0.2)  # 10
    assert default_data_beta(1.0) == 0.3
    assert default_data_beta(2.0) == pytest.approx(1.5)
    assert default_data_beta(4.5) == pytest.approx(0.15 * (20.25 / 0.8 + 12.25 / 0.2))  # 12.98
    assert default_data_beta(2.0, 1 / 3) == pytest.approx(0.15 * (4 * 1.5 + 1 * 3))  # 1.35: the optimal p at w = 2
    assert default_data_beta(2.0, 0.0) == default_data_beta(2.0)  # no dropout: the rule takes the default p
    assert default_data_beta(1.1) == 0.3  # 0.15 · 1.5625 would be weaker than unguided
    with pytest.raises(ValueError, match="prompt dropout must be in \\(0, 1\\)"):
        guidance_amplification(2.0, 0.0)

    def config(**kw):
        return DDRLConfig(output_dir="unused", report_to="none", **kw)

    assert config().data_beta == 0.3
    assert config(cfg_scale=2.0).data_beta == pytest.approx(1.5)
    assert config(cfg_scale=4.5, data_prompt_dropout=0.5).data_beta == pytest.approx(0.15 * (20.25 + 12.25) / 0.5)
    assert config(cfg_scale=4.5, data_beta=20.0).data_beta == 20.0
    assert config(cfg_scale=4.5, data_beta=0.0).data_beta == 0.0
    parsed = HfArgumentParser(DDRLConfig).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--report_to", "none", "--cfg_scale", "2"]
    )[0]
    assert parsed.data_beta == pytest.approx(1.5)


def test_guided_held_out_loss_equals_a_hand_computation(tmp_path, reference_dataset):
    """`evaluate()` under guidance: the conditional loss as before, and the guided output's loss on the same seeded
    draws, with each row's negative prompt from `negative_prompt_column` — both against a hand computation of the
    trained model and of the base (the LoRA switched off)."""
    scale, negatives = 3.0, ["ugly", "blurry", "", "dark", "ugly", "a green bird"]
    data = reference_dataset.add_column("neg", negatives)
    trainer = make_trainer(
        tmp_path,
        data,
        peft_config=lora(),
        eval_dataset=data,
        cfg_scale=scale,
        negative_prompt_column="neg",
        max_steps=1,
        eval_noise_draws=2,
        per_device_eval_batch_size=4,  # two batches: 4 + 2 rows
    )
    trainer.train()
    got = trainer.evaluate()

    args, adapter, sampler = trainer.args, trainer.adapter, trainer.sampler
    x0 = torch.stack([torch.as_tensor(row) for row in trainer.eval_dataset["ddrl_ref_latents"]])
    cond = adapter.encode_prompts(list(data["prompt"]))
    uncond = adapter.encode_prompts(negatives)
    noise_source = SeededNoise(args.seed, torch.device("cpu"), args.num_generations)
    rows = list(range(6))

    def losses(unet):
        plain = guided = 0.0
        for draw in range(2):
            noise = noise_source.draw_for(f"eval-noise{draw}", rows, tuple(x0.shape[1:]))
            t = torch.cat([sampler.sample_timesteps(1, noise_source.generator(f"eval-t{draw}", i)) for i in rows])
            x_t = sampler.add_noise(x0, noise, t)
            eps_c = unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
            eps_u = unet(x_t, t, encoder_hidden_states=uncond["encoder_hidden_states"]).sample
            plain += ((eps_c - noise) ** 2).mean().item() / 2
            guided += ((eps_u + scale * (eps_c - eps_u) - noise) ** 2).mean().item() / 2
        return plain, guided

    unet = adapter.denoiser
    with torch.no_grad():
        trained = losses(unet)
        unet.disable_adapters()
        base = losses(unet)
        unet.enable_adapters()
    assert got["eval_diffusion_loss"] == pytest.approx(trained[0], rel=1e-5)
    assert got["eval_guided_diffusion_loss"] == pytest.approx(trained[1], rel=1e-5)
    assert got["eval_diffusion_loss_ratio"] == pytest.approx(trained[0] / base[0], rel=1e-5)
    assert got["eval_guided_diffusion_loss_ratio"] == pytest.approx(trained[1] / base[1], rel=1e-5)
    assert trained[1] != pytest.approx(trained[0], rel=1e-3)  # guidance does change the measured output

    unguided = make_trainer(tmp_path / "unguided", reference_dataset, eval_dataset=reference_dataset)
    assert {key for key in unguided.evaluate() if key.startswith("eval_")} == {
        "eval_diffusion_loss",
        "eval_diffusion_loss_ratio",
    }


def test_guided_held_out_loss_needs_the_negative_prompt_column_in_the_eval_data(tmp_path, reference_dataset):
    data = reference_dataset.add_column("neg", ["ugly"] * 6)
    message = "negative_prompt_column='neg' is not a column of the evaluation dataset .* add the column to it"
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, data, eval_dataset=reference_dataset, cfg_scale=2.0, negative_prompt_column="neg")
    trainer = make_trainer(tmp_path, data, cfg_scale=2.0, negative_prompt_column="neg")
    with pytest.raises(ValueError, match=message):
        trainer.evaluate(reference_dataset)


def test_the_policy_decides_guidance_once_and_forwards_both_branches_together():
    """`Policy.conditioning` carries the unconditional branch only when cfg_scale > 1; `forward` then returns the
    guided output ε_∅ + w (ε_c − ε_∅) and the conditional branch, equal to separate denoiser calls."""
    adapter = get_adapter(tiny_sd_pipeline())
    adapter.resolution = adapter.default_resolution
    shape = adapter.latent_shape(adapter.resolution)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 200])
    unguided = Policy(adapter, None, shape, cfg_scale=1.0, unconditional=UnconditionalPrompts(adapter, "a green bird"))
    conditions = unguided.conditioning(PROMPTS)
    assert conditions.uncond is None
    with torch.no_grad():
        out = unguided.forward(x, t, conditions)
        assert out.policy is out.conditional and out.extra is None
        torch.testing.assert_close(out.policy, adapter.predict(x, t, adapter.encode_prompts(PROMPTS)))

        guided = Policy(
            adapter, None, shape, cfg_scale=3.0, unconditional=UnconditionalPrompts(adapter, "a green bird")
        )
        conditions = guided.conditioning(PROMPTS)
        out = guided.forward(x, t, conditions)
        cond = adapter.predict(x, t, adapter.encode_prompts(PROMPTS))
        uncond = adapter.predict(x, t, adapter.encode_prompts(["a green bird"] * 2))
    torch.testing.assert_close(out.conditional, cond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.policy, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
