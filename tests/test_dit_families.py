"""The 2025–26 DiT families with language-model text encoders (Qwen-Image, FLUX.2 [dev] / [klein], Z-Image, SANA,
Cosmos-Predict2.5) end to end on tiny offline pipelines.

Each family is checked for: the same denoising trajectory as its own diffusers pipeline, unguided and (where the
model has an unconditional branch) guided through `pipeline_call_kwargs` (packing, latent normalisation, timestep
units and sign, schedule and shift, the family's guidance formula); the denoiser call of the family's training
script; and a 2-step DDRL training, guided where possible, whose weights reload through plain diffusers (LoRA with
alpha ≠ r and rank patterns, and full fine-tuning) with the on-policy ratio at 1.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    Flux2Pipeline,
    QwenImagePipeline,
    UniPCMultistepScheduler,
)
from helpers import lora, make_trainer

from ddrl_trl import DDRLConfig
from ddrl_trl.adapters import (
    CosmosPredict25Adapter,
    Flux2Adapter,
    Flux2KleinAdapter,
    QwenImageAdapter,
    SanaAdapter,
    ZImageAdapter,
    get_adapter,
)
from ddrl_trl.core import combine_guidance, rescale_to_conditional_norm
from ddrl_trl.step.policy import Policy, UnconditionalPrompts
from ddrl_trl.testing import (
    tiny_cosmos_pipeline,
    tiny_flux2_klein_pipeline,
    tiny_flux2_pipeline,
    tiny_qwenimage_pipeline,
    tiny_sana_pipeline,
    tiny_zimage_pipeline,
)
from ddrl_trl.testing.cosmos_pipelines import TINY_MAX_SEQUENCE_LENGTH as COSMOS_LENGTH

PROMPTS = ["a red cat", "a blue dog"]


def _identity(adapter, latents):
    return latents


def _qwen_pack(adapter, x):
    return QwenImagePipeline._pack_latents(x, *x.shape)


def _qwen_unpack(adapter, out):
    side = adapter.resolution // adapter.vae_scale_factor
    return adapter._unpack(out, side, side)


def _flux2_dev_latents(adapter, out):
    """FLUX.2 [dev]'s output_type="latent": packed, still normalised tokens (B, h·w, C), row-major."""
    side = adapter.resolution // (adapter.vae_scale_factor * adapter.denoiser_downsampling)
    return out.transpose(1, 2).reshape(out.shape[0], -1, side, side)


def _flux2_klein_latents(adapter, out):
    """FLUX.2 [klein]'s output_type="latent": de-normalised, unpatchified VAE latents; back to the trained space."""
    patched = Flux2Pipeline._patchify_latents(out.float())
    mean, std = adapter._bn_stats(patched)
    return (patched - mean) / std


def _sana_first_order(scheduler):
    """SANA ships order-2 DPM-Solver on flow sigmas; at order 1 it is exactly the Euler step on the same sigmas."""
    return DPMSolverMultistepScheduler.from_config(scheduler.config, solver_order=1)


def _cosmos_first_order(scheduler):
    """Cosmos ships order-2 UniPC on Karras flow sigmas; order 1 without corrector is the Euler step on them."""
    return UniPCMultistepScheduler.from_config(scheduler.config, solver_order=1, disable_corrector=list(range(5)))


@dataclass
class Family:
    build: Callable
    adapter: type
    config: dict
    guided: bool  # has an unconditional branch (classifier-free guidance)
    to_pipeline: Callable = _identity  # our latents -> the pipeline's `latents=`
    from_pipeline: Callable = _identity  # the pipeline's output_type="latent" -> our latents
    first_order: Callable | None = None  # the shipped multistep scheduler's Euler twin
    extra: dict = field(default_factory=dict)


SMALL = {"resolution": 32, "max_sequence_length": 16}
COSMOS = {"resolution": 32, "num_frames": 9, "max_sequence_length": COSMOS_LENGTH}
FAMILIES = {
    "qwenimage": Family(tiny_qwenimage_pipeline, QwenImageAdapter, SMALL, True, _qwen_pack, _qwen_unpack),
    "flux2-dev": Family(tiny_flux2_pipeline, Flux2Adapter, SMALL, False, from_pipeline=_flux2_dev_latents),
    "flux2-klein": Family(
        tiny_flux2_klein_pipeline, Flux2KleinAdapter, SMALL, True, from_pipeline=_flux2_klein_latents
    ),
    "flux2-klein-distilled": Family(
        lambda: tiny_flux2_klein_pipeline(is_distilled=True), Flux2KleinAdapter, SMALL, False,
        from_pipeline=_flux2_klein_latents,
    ),
    "zimage": Family(tiny_zimage_pipeline, ZImageAdapter, SMALL, True),
    "sana": Family(tiny_sana_pipeline, SanaAdapter, SMALL, True, first_order=_sana_first_order),
    "cosmos": Family(tiny_cosmos_pipeline, CosmosPredict25Adapter, COSMOS, True, first_order=_cosmos_first_order),
    "cosmos-image": Family(
        tiny_cosmos_pipeline, CosmosPredict25Adapter, {**COSMOS, "num_frames": 1}, True,
        first_order=_cosmos_first_order,
    ),
}  # fmt: skip

GUIDANCE = {"unguided": (1.0, None), "guided": (3.0, None), "guided-negative": (3.0, "a blurry photo")}
TRAJECTORIES = [(n, g) for n, f in FAMILIES.items() for g in GUIDANCE if f.guided or g == "unguided"]


def configured(pipe, **config):
    adapter = get_adapter(pipe)
    args = DDRLConfig(output_dir="unused", report_to="none", num_inference_steps=5, **config)
    adapter.configure(args)
    return adapter, args


@pytest.mark.parametrize("name,guidance", TRAJECTORIES)
def test_noise_free_policy_retraces_the_pipelines_own_call(name, guidance):
    """The policy's steps with the noise level → 0 are the pipeline's own sampling, called with
    `adapter.pipeline_call_kwargs` alone: Z-Image and Cosmos get guidance_scale = cfg_scale − 1, Qwen-Image its
    norm-rescaled true CFG, klein its negative prompt as embeddings, SANA no resolution binning."""
    family = FAMILIES[name]
    cfg_scale, negative = GUIDANCE[guidance]
    pipe = family.build()
    if family.first_order is not None:
        pipe.scheduler = family.first_order(pipe.scheduler)
    adapter, args = configured(
        pipe, flow_noise_level=1e-9, cfg_scale=cfg_scale, negative_prompt=negative, **family.config
    )
    assert isinstance(adapter, family.adapter)
    sampler = adapter.make_sampler(args, torch.device("cpu"))
    x = torch.randn(2, *adapter.latent_shape(adapter.resolution), generator=torch.Generator().manual_seed(0))

    kwargs = {**adapter.pipeline_call_kwargs(args, len(PROMPTS)), "output_type": "latent"}
    out = pipe(prompt=list(PROMPTS), latents=family.to_pipeline(adapter, x.clone()), **kwargs)
    expected = family.from_pipeline(adapter, out.frames if name.startswith("cosmos") else out.images)

    policy = Policy(
        adapter, sampler, x.shape[1:], cfg_scale=cfg_scale, unconditional=UnconditionalPrompts(adapter, negative)
    )
    conditions = policy.conditioning(PROMPTS)
    latents = x
    with torch.no_grad():
        for j, t in enumerate(sampler.timesteps):
            output = policy.forward(latents, t.expand(2), conditions).policy
            latents = sampler.step_mean(output, j, latents)
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)


def test_qwen_image_guidance_rescales_each_token_to_the_conditional_norm():
    cond, uncond = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0, 4.0], [1.0, 1.0]])
    guided = combine_guidance(cond, uncond, 2.0)  # [[6, 4], [1, -1]]
    expected = torch.tensor([[6.0, 4.0], [1.0, -1.0]])
    expected = expected * torch.tensor([[5.0 / 52**0.5], [1.0 / 2**0.5]])
    torch.testing.assert_close(rescale_to_conditional_norm(guided, cond), expected)
    # The adapter applies it over each packed 2×2 token's 4·C channels (as the pipeline, on its packed outputs).
    adapter, _ = configured(tiny_qwenimage_pipeline(), **SMALL)
    c, u = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    pc, pu = _qwen_pack(adapter, c), _qwen_pack(adapter, u)
    combined = pu + 4.0 * (pc - pu)
    expected = combined * pc.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(adapter.combine_guidance(c, u, 4.0), _qwen_unpack(adapter, expected))


def test_distilled_guidance_defaults_to_each_pipelines_own_value():
    from ddrl_trl.testing import tiny_flux_pipeline

    assert configured(tiny_flux_pipeline(), resolution=32)[0].guidance_scale == 3.5  # FluxPipeline's default
    assert configured(tiny_flux2_pipeline(), **SMALL)[0].guidance_scale == 4.0  # Flux2Pipeline's default
    adapter, args = configured(tiny_flux2_pipeline(), guidance_scale=2.5, **SMALL)
    assert adapter.guidance_scale == 2.5 and adapter.pipeline_call_kwargs(args, 1)["guidance_scale"] == 2.5


def _script_prediction(name, pipe, adapter, args, noisy, timesteps, prompts):
    """The denoiser output as the family's training script computes it, in our convention (velocity ε − x0)."""
    t = pipe.transformer
    batch = noisy.shape[0]
    if name == "qwenimage":  # train_dreambooth_lora_qwen_image.py: packed, t / 1000, masked prompt embeddings
        embeds, mask = pipe.encode_prompt(prompts, max_sequence_length=16)
        side = noisy.shape[-1]
        out = t(
            hidden_states=_qwen_pack(adapter, noisy), encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
            timestep=timesteps / 1000, img_shapes=[(1, side // 2, side // 2)] * batch, return_dict=False,
        )[0]  # fmt: skip
        return _qwen_unpack(adapter, out)
    if name.startswith("flux2"):  # train_dreambooth_lora_flux2(_klein).py: token ids, t / 1000, guidance for [dev]
        embeds, text_ids = pipe.encode_prompt(
            prompts, max_sequence_length=16, text_encoder_out_layers=adapter.text_encoder_out_layers
        )
        ids = Flux2Pipeline._prepare_latent_ids(noisy)
        guidance = torch.full([batch], adapter.guidance_scale) if t.config.guidance_embeds else None
        out = t(
            hidden_states=Flux2Pipeline._pack_latents(noisy), timestep=timesteps / 1000, guidance=guidance,
            encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids, return_dict=False,
        )[0]  # fmt: skip
        return Flux2Pipeline._unpack_latents_with_ids(out, ids)
    if name == "zimage":  # train_dreambooth_lora_z_image.py: lists, (1000 − t) / 1000, negated output
        captions, _ = pipe.encode_prompt(prompt=list(prompts), max_sequence_length=16)
        out = t(list(noisy.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)
    if name == "sana":  # train_dreambooth_lora_sana.py: the raw timestep, masked Gemma states
        embeds, mask, _, _ = pipe.encode_prompt(
            prompts, max_sequence_length=16, complex_human_instruction=adapter.complex_human_instruction
        )
        return t(noisy, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timesteps,
                 return_dict=False)[0]  # fmt: skip
    # Cosmos-Predict2.5 (the authors' text2world training): t itself, zero condition and padding masks
    embeds, _ = pipe.encode_prompt(prompts, max_sequence_length=COSMOS_LENGTH)
    b, _, f, h, w = noisy.shape
    side = adapter.resolution
    return t(
        hidden_states=noisy, timestep=timesteps / 1000, encoder_hidden_states=embeds,
        condition_mask=torch.zeros(b, 1, f, h, w), padding_mask=torch.zeros(1, 1, side, side), return_dict=False,
    )[0]  # fmt: skip


@pytest.mark.parametrize("name", ["qwenimage", "flux2-dev", "flux2-klein", "zimage", "sana", "cosmos"])
def test_denoiser_call_matches_the_training_script(name):
    """`predict` on the data term's x_t = (1 − t) x0 + t ε equals the transformer as the family's training script
    calls it (its regression target is ε − x0 for all of them)."""
    family = FAMILIES[name]
    pipe = family.build()
    adapter, args = configured(pipe, **family.config)
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(3, *adapter.latent_shape(adapter.resolution), generator=gen)
    timesteps = torch.tensor([990.0, 500.0, 10.0])
    prompts = ["a red cat", "a big blue dog", "a cat"]
    with torch.no_grad():
        ours = adapter.predict(noisy, timesteps, adapter.encode_prompts(prompts))
        script = _script_prediction(name, pipe, adapter, args, noisy, timesteps, prompts)
    torch.testing.assert_close(ours, script, rtol=1e-5, atol=1e-5)


def test_cosmos_data_term_times_follow_the_authors_logit_normal_density_and_dropout_zeroes_the_text():
    adapter, args = configured(tiny_cosmos_pipeline(), **COSMOS)
    sampler = adapter.make_sampler(args, torch.device("cpu"))
    t = sampler.sample_timesteps(20000, torch.Generator().manual_seed(0)) / 1000
    logit = torch.logit(t)
    assert abs(logit.mean().item() - torch.tensor(5.0).log().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03
    # The rollout feeds the transformer the float sigmas, not UniPC's truncated integer timesteps.
    torch.testing.assert_close(sampler.timesteps / 1000, sampler.sigmas[:-1])
    null = adapter.encode_null(3)["encoder_hidden_states"]  # the authors' text dropout: zero embeddings
    assert null.shape == adapter.encode_prompts(["a red cat"] * 3)["encoder_hidden_states"].shape and not null.any()


def test_qwen_image_prompt_dropout_uses_the_empty_prompt_not_the_default_negative():
    adapter, _ = configured(tiny_qwenimage_pipeline(), **SMALL)
    null = adapter.encode_null(2)
    torch.testing.assert_close(null, adapter.encode_prompts(["", ""]))
    negative = adapter.encode_unconditional(None, 2)  # the guided branch's " "
    assert (null["encoder_hidden_states"] - negative["encoder_hidden_states"]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "name,config,message",
    [
        ("flux2-dev", {"cfg_scale": 2.0}, "no unconditional branch"),
        ("flux2-klein-distilled", {"cfg_scale": 2.0}, "no unconditional branch"),
        ("cosmos", {"cfg_scale": 1.5}, "cannot sample a cfg_scale in"),
    ],
)
def test_guidance_the_pipeline_cannot_sample_is_refused_at_configure(name, config, message):
    family = FAMILIES[name]
    with pytest.raises(ValueError, match=message):
        configured(family.build(), **{**family.config, **config})


@pytest.mark.parametrize("name", ["qwenimage", "flux2-dev", "flux2-klein", "zimage", "sana", "cosmos"])
def test_script_family_defaults_parse_and_suit_the_pipeline(name, tmp_path):
    """`ddrl-trl train` infers each family from the pipeline class in model_index.json, and that family's defaults
    (`FAMILY_DEFAULTS`: the Hub model, guidance, frames) parse into a config the family's adapter accepts."""
    from ddrl_trl.cli.train import FAMILY_DEFAULTS, infer_family, make_parser

    pipe = FAMILIES[name].build()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text(f'{{"_class_name": "{type(pipe).__name__}"}}')
    family = infer_family(str(tmp_path / "model"))
    assert family == get_adapter(pipe).script_family and family in FAMILY_DEFAULTS
    _, args, model_args, *_ = make_parser(family).parse_args_and_config(
        args=["--reward_funcs", "brightness", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    )
    assert model_args.model_name_or_path == FAMILY_DEFAULTS[family]["model_name_or_path"]
    assert args.cfg_scale == FAMILY_DEFAULTS[family].get("cfg_scale", 1.0) and args.bf16 and model_args.use_peft
    # data_beta is left to DDRLConfig: the guided anchor for the family's cfg_scale, 0.15 · F(w, 0.2)
    expected_beta = {1.0: 0.3, 4.0: 0.15 * (16 / 0.8 + 9 / 0.2), 4.5: 0.15 * (20.25 / 0.8 + 12.25 / 0.2)}
    expected_beta[5.0] = 0.15 * (25 / 0.8 + 16 / 0.2)
    assert args.data_beta == pytest.approx(expected_beta[args.cfg_scale], rel=1e-12)
    get_adapter(pipe).configure(args)  # guidance and frames valid for this pipeline (512 px fits every tiny one)


@pytest.mark.parametrize(
    "name,config,expected",
    [
        ("zimage", {"cfg_scale": 5.0}, "guidance_scale=4, negative_prompt=''"),
        ("cosmos", {"cfg_scale": 8.0, "negative_prompt": "blurry"}, "guidance_scale=7, negative_prompt='blurry'"),
        ("qwenimage", {"cfg_scale": 4.0}, "true_cfg_scale=4, negative_prompt=' '"),
        (
            "flux2-klein",
            {"cfg_scale": 4.0, "negative_prompt": "blurry"},
            "guidance_scale=4, negative_prompt_embeds=pipe.encode_prompt('blurry')[0]",
        ),
    ],
)
def test_model_card_tells_how_to_sample_as_the_rollouts_did(name, config, expected):
    """The card's sampling line uses the pipeline's own guidance argument and value (Z-Image / Cosmos: w − 1) and
    the way it takes a negative prompt (klein: embeddings only)."""
    from types import SimpleNamespace

    from ddrl_trl.monitoring.model_card import _guidance_note

    family = FAMILIES[name]
    adapter, args = configured(family.build(), **{**family.config, **config})
    note = " ".join(_guidance_note(SimpleNamespace(args=args, adapter=adapter)))
    assert f"`{expected}`" in note


def test_family_is_inferred_at_the_model_revision(monkeypatch, tmp_path):
    """Cosmos keeps its diffusers files on a branch: the Hub lookup of model_index.json asks for that revision."""
    import huggingface_hub

    from ddrl_trl.cli.train import infer_family

    asked = []

    def fake_download(repo, filename, revision=None):
        asked.append((repo, filename, revision))
        path = tmp_path / "model_index.json"
        path.write_text('{"_class_name": "Cosmos2_5_PredictBasePipeline"}')
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert infer_family("nvidia/Cosmos-Predict2.5-2B", "diffusers/base/post-trained") == "cosmos"
    assert asked == [("nvidia/Cosmos-Predict2.5-2B", "model_index.json", "diffusers/base/post-trained")]


def test_synthetic_references_from_the_new_families():
    """`build_synthetic_reference_dataset(config=...)` calls pipelines whose first argument is an image by
    `prompt=` (FLUX.2 [klein], guided), takes Cosmos' one-frame videos as images, and refuses a video configuration
    before sampling anything."""
    from ddrl_trl.data import build_synthetic_reference_dataset

    def run(name, **config):
        family = FAMILIES[name]
        args = DDRLConfig(output_dir="unused", report_to="none", num_inference_steps=2, **{**family.config, **config})
        return build_synthetic_reference_dataset(family.build(), ["a red cat", "a blue dog"], config=args)

    klein = run("flux2-klein", cfg_scale=2.0)
    assert klein["prompt"] == ["a red cat", "a blue dog"] and klein[0]["image"].size == (32, 32)
    image_mode = run("cosmos-image")
    assert image_mode[1]["image"].size == (32, 32)
    with pytest.raises(ValueError, match="configured for videos of 9 frames"):
        run("cosmos")


def _dataset(name, reference_dataset, reference_videos):
    return reference_videos if name == "cosmos" else reference_dataset


@pytest.mark.parametrize("kind", ["lora-patterns", "full"])
@pytest.mark.parametrize("name", ["qwenimage", "flux2-dev", "flux2-klein", "zimage", "sana", "cosmos"])
def test_two_step_ddrl_training_reloads_in_diffusers(name, kind, tmp_path, reference_dataset, reference_videos,
                                                     observe):  # fmt: skip
    """Guided where the family has an unconditional branch (Cosmos above 2: its pipeline's floor), with prompt
    dropout on the data term; a patterned LoRA with alpha ≠ r reloads through `load_lora_weights` at its trained
    strength, a full fine-tune through `from_pretrained`."""
    family = FAMILIES[name]
    guidance = {"cfg_scale": 3.0} if family.guided else {}
    ratios = []
    observe("step_terms", lambda terms, **_: ratios.append(terms.ratio))
    use_lora = kind != "full"
    trainer = make_trainer(
        tmp_path,
        _dataset(name, reference_dataset, reference_videos),
        peft_config=lora(patterns=True) if use_lora else None,
        pipeline=family.build(),
        max_steps=2,
        **family.config,
        **guidance,
    )
    trainer.train()
    assert torch.stack(ratios).sub(1).abs().max().item() < 1e-5
    assert trainer.state.log_history[0]["loss/data"] > 0
    trainer.save_model()

    plain = family.build()
    if use_lora:
        plain.load_lora_weights(str(tmp_path / "out"))
    else:
        plain.transformer = type(plain.transformer).from_pretrained(str(tmp_path / "out" / "transformer"))
    reloaded, _ = configured(plain, **family.config)
    base, _ = configured(family.build(), **family.config)
    x = torch.randn(2, *trainer.latent_shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([900.0, 400.0])
    cond = trainer.adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        trained_out = trainer.adapter.predict(x, t, cond)
        reloaded_out = reloaded.predict(x, t, cond)
        base_out = base.predict(x, t, cond)
    torch.testing.assert_close(reloaded_out, trained_out, rtol=1e-5, atol=1e-6)
    assert (reloaded_out - base_out).abs().max() > 1e-6
