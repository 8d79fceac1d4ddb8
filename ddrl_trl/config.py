"""`DDRLConfig`: every knob of a DDRL run, as a `transformers.TrainingArguments` dataclass (TRL style)."""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field, fields

import torch
from transformers import TrainingArguments

#: `data_beta` of unguided rollouts, calibrated on the digits benchmark (docs/concepts.md).
UNGUIDED_DATA_BETA = 0.3
#: The data term's prompt dropout under guidance by default: the authors' text dropout.
GUIDED_PROMPT_DROPOUT = 0.2
#: The largest `cfg_scale`: models are sampled at 1.5–20; far beyond it the guided default `data_beta` explodes
#: (w = 1e30 gives 9.4e59, every loss non-finite) and w² overflows.
MAX_CFG_SCALE = 100.0
#: The smallest non-zero `data_prompt_dropout` under guidance: F(w, p) grows as 1/p (p = 1e-300 gives data_beta
#: 1.5e299).
MIN_GUIDED_PROMPT_DROPOUT = 0.01
#: The largest `data_beta`, set or resolved: beyond it the reward's gradient is lost in float32 rounding next to the
#: data term's, and the data term's loss nears float overflow.
MAX_DATA_BETA = 1e6


def guidance_amplification(cfg_scale: float, prompt_dropout: float) -> float:
    """How much more a guided policy moves than an unguided one under the same data term (docs/concepts.md):

        F(w, p) = w² / (1 − p) + (w − 1)² / p

    The guided output ε̂ = w ε_c − (w − 1) ε_∅ moves by w Δε_c − (w − 1) Δε_∅, while the data term holds each branch
    only with its share of the samples, β [(1 − p) |Δε_c|² + p |Δε_∅|²]. Balancing a policy-gradient pull g on ε̂
    against that anchor moves ε̂ by F · g / (2β), against g / (2β) unguided (F = 1 at w = 1). It counts the two
    branches as independent; they share one network, so the real amplification is smaller.

    Raises `ValueError` (never `OverflowError`, never returns ±inf) for non-finite arguments and where F overflows.
    """
    if not (_is_real(cfg_scale) and math.isfinite(cfg_scale)):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}.")
    if cfg_scale <= 1:
        return 1.0
    if not (_is_real(prompt_dropout) and 0 < prompt_dropout < 1):
        raise ValueError(f"Under guidance the prompt dropout must be in (0, 1), got {prompt_dropout}.")
    w, p = float(cfg_scale), float(prompt_dropout)
    amplification = w * w / (1 - p) + (w - 1) * (w - 1) / p  # w * w: inf on overflow, where w**2 raises
    if not math.isfinite(amplification):
        raise ValueError(
            f"The guidance amplification F(w, p) overflows for cfg_scale={cfg_scale!r} and prompt dropout "
            f"{prompt_dropout!r}: keep cfg_scale ≤ {MAX_CFG_SCALE:g} and the dropout ≥ {MIN_GUIDED_PROMPT_DROPOUT:g}."
        )
    return amplification


def default_data_beta(cfg_scale: float = 1.0, prompt_dropout: float | None = None) -> float:
    """`DDRLConfig.data_beta` when left unset: 0.3 unguided; under guidance 0.15 · F(w, p)
    (`guidance_amplification`, p the data term's prompt dropout, 0.2 when None or 0), never below 0.3.

    The factor 0.15 is measured on the digits benchmark (docs/concepts.md): at w = 2 (F = 10) data_beta 1.5 kept the
    judge at 1.00 and every held-out ratio under 1.05 for 100 steps with the reward up by a third, where 1.0 let the
    judge slip from step 70 and 0.3 hacked; at w = 4.5 (F = 86.6) the rule gives 13. Always finite: arguments that
    would overflow raise `ValueError` (`DDRLConfig` also bounds the result by `MAX_DATA_BETA`).
    """
    if not (_is_real(cfg_scale) and math.isfinite(cfg_scale)):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}.")
    if cfg_scale <= 1:
        return UNGUIDED_DATA_BETA
    p = prompt_dropout if prompt_dropout else GUIDED_PROMPT_DROPOUT
    return max(UNGUIDED_DATA_BETA, 0.15 * guidance_amplification(cfg_scale, p))


def _is_real(value) -> bool:
    """A real number, not a bool (the one check of numeric settings here and in `monitoring/hacking_monitor.py`)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer_kind(spec) -> str | None:
    """`"int"` for a dataclass field annotated `int` (or `int | None`), `"list"` for `list[int]` (or `| None`)."""
    annotation = spec.type
    if not isinstance(annotation, str):
        annotation = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    compact = annotation.replace(" ", "").replace("typing.", "")
    if compact in ("int", "int|None", "None|int", "Optional[int]"):
        return "int"
    if compact in ("list[int]", "list[int]|None", "None|list[int]", "Optional[list[int]]", "List[int]"):
        return "list"
    return None


def _as_integer(value) -> int | None:
    """`value` as an int if it is a whole number (an int, or an integral float such as 2.0 read from YAML), else
    None. The `int` fields here and the monitor's `eval_steps` (`monitoring/hacking_monitor.py`) use it."""
    if not _is_real(value):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return int(value) if math.isfinite(value) and float(value).is_integer() else None


_DATA_CHOICES = ("rollout", "random")


def _positive_or_none(value) -> bool:
    return value is None or value >= 1


#: The range checks of `DDRLConfig`, in order: (field, valid(value), message with the field's range and why).
_RANGE_CHECKS = (
    (
        "num_generations",
        lambda v: v >= 2,
        "num_generations must be at least 2 (advantages are relative to the group), got {value}.",
    ),
    (
        "num_inference_steps",
        lambda v: v >= 2,
        "num_inference_steps must be ≥ 2 (the last step is never trained), got {value}.",
    ),
    (
        "eta",
        lambda v: 0 < v <= 1,
        "eta must be in (0, 1]: > 0 so DDIM steps have a log-probability, ≤ 1 because above it DDIM's variance "
        "exceeds what the step allows (the sampler would stop being DDIM), got {value}.",
    ),
    (
        "flow_noise_level",
        lambda v: v > 0,
        "flow_noise_level must be > 0 so sampler steps have a log-probability, got {value}.",
    ),
    (
        "cfg_scale",
        lambda v: v >= 1,
        "cfg_scale must be ≥ 1 (1 turns classifier-free guidance off, as diffusers does for any scale ≤ 1), got "
        "{value}.",
    ),
    (
        "cfg_scale",
        lambda v: v <= MAX_CFG_SCALE,
        f"cfg_scale must be ≤ {MAX_CFG_SCALE:g}, got {{value:g}}: models are sampled at 1.5 to 20, and far beyond "
        "that the guided data_beta explodes and every step turns non-finite. Set the guidance scale you sample the "
        "model with (e.g. 4.5).",
    ),
    (
        "data_prompt_dropout",
        lambda v: v is None or 0 <= v < 1,
        "data_prompt_dropout must be in [0, 1) (the share of data-term samples trained unconditionally) or None for "
        "the default, got {value}.",
    ),
    (
        "data_beta",
        lambda v: v is None or v >= 0,
        "data_beta must be ≥ 0 (0 turns the data term off: plain GRPO), got {value}.",
    ),
    (
        "data_beta",
        lambda v: v is None or v <= MAX_DATA_BETA,
        f"data_beta must be ≤ {MAX_DATA_BETA:g}, got {{value:g}}: beyond it the reward's gradient is lost in float32 "
        "rounding next to the data term's (the guided default is 1.5 at cfg_scale 2, 13 at 4.5).",
    ),
    ("kl_beta", lambda v: v >= 0, "kl_beta must be ≥ 0 (0 turns the reverse-KL term off), got {value}."),
    ("epsilon", lambda v: v > 0, "epsilon (the PPO clip range) must be > 0, got {value}."),
    (
        "advantage_clip",
        lambda v: v > 0,
        "advantage_clip must be > 0 (advantages are clamped to ±advantage_clip), got {value}.",
    ),
    (
        "reward_clip",
        lambda v: v is None or v > 0,
        "reward_clip must be > 0 (rewards are clipped to ±reward_clip) or None to turn clipping off, got {value}.",
    ),
    (
        "max_reference_upscale",
        lambda v: v >= 1,
        "max_reference_upscale must be ≥ 1 (1 refuses any upscaling of reference samples), got {value}.",
    ),
    ("max_consecutive_nonfinite_steps", lambda v: v >= 1, "max_consecutive_nonfinite_steps must be ≥ 1, got {value}."),
    (
        "num_iterations",
        lambda v: v >= 1,
        "num_iterations must be ≥ 1 (optimiser steps per rollout batch), got {value}.",
    ),
    ("train_step_stride", lambda v: v >= 1, "train_step_stride must be ≥ 1, got {value}."),
    ("data_noise", lambda v: v in _DATA_CHOICES, f"data_noise must be one of {_DATA_CHOICES}, got {{value!r}}."),
    (
        "data_timesteps",
        lambda v: v in _DATA_CHOICES,
        f"data_timesteps must be one of {_DATA_CHOICES}, got {{value!r}}.",
    ),
    (
        "multi_objective_aggregation",
        lambda v: v in ("sum_then_normalize", "normalize_then_sum"),
        "multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', got {value!r}.",
    ),
    (
        "scale_rewards",
        lambda v: v in ("group", "batch", "none"),
        "scale_rewards must be 'group', 'batch' or 'none', got {value!r}.",
    ),
    (
        "target_loss_ratio",
        lambda v: v is None or v > 1,
        "target_loss_ratio must be > 1 (the data term's diffusion loss "
        "over the base model's, e.g. 1.05), got {value}; None keeps data_beta fixed.",
    ),
    (
        "data_beta_adapt_rate",
        lambda v: 0 < v <= 1,
        "data_beta_adapt_rate must be in (0, 1] (the largest change of log(data_beta) per step), got {value}.",
    ),
    ("resolution", lambda v: v is None or v > 0, "resolution must be a positive number of pixels, got {value}."),
    ("ema_decay", lambda v: v is None or 0 < v < 1, "ema_decay must be in (0, 1) (e.g. 0.999) or None, got {value}."),
    *(
        (name, lambda v: v >= 1, f"{name} must be ≥ 1, got {{value}}.")
        for name in ("preprocess_batch_size", "eval_noise_draws", "num_sample_images")
    ),
    (
        "validation_images_per_prompt",
        lambda v: v >= 2,
        "validation_images_per_prompt must be ≥ 2 (diversity is "
        "measured between the samples of a prompt), got {value}.",
    ),
    ("num_validation_prompts", lambda v: v >= 0, "num_validation_prompts must be ≥ 0, got {value}."),
    *(
        (name, _positive_or_none, f"{name} must be a positive integer or None, got {{value}}.")
        for name in ("num_frames", "max_sequence_length", "rollout_chunk_groups", "validation_steps")
    ),
)


def _checked_prompts(prompts) -> list[str]:
    """`validation_prompts` as a list of non-blank strings, or a ValueError naming the first bad entry."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"validation_prompts must be a non-empty list of prompts, got {prompts!r}.")
    blank = [i for i, p in enumerate(prompts) if not (isinstance(p, str) and p.strip())]
    if blank:
        raise ValueError(
            f"validation_prompts must be non-blank strings; entry {blank[0]} is {prompts[blank[0]]!r} (of "
            f"{prompts!r}): remove it or write the prompt."
        )
    return list(prompts)


@dataclass
class DDRLConfig(TrainingArguments):
    r"""
    Configuration for [`DDRLTrainer`]. Only DDRL-specific fields are listed; all of
    [`~transformers.TrainingArguments`] applies. Defaults that differ from `TrainingArguments` follow the released
    DDRL configs (AdamW β₂ 0.99, weight decay 1e-4, grad clip 1.0) and TRL (logging every 10 steps); DDP does not
    search for unused parameters (`ddp_find_unused_parameters=False`: every forward uses every trained weight), and
    `dataloader_pin_memory` is turned off on a machine without an accelerator (pinning needs one).

    Batch sizes count **rollouts**, as in TRL's `GRPOConfig`: each micro-step draws
    `per_device_train_batch_size × processes / num_generations` prompts and rolls each out `num_generations` times; a
    group may span two processes (its rewards are gathered for the advantages), so only that product must be a
    multiple of `num_generations`.

    Every `int` field (these and `TrainingArguments`') takes a whole number: an integral float (2.0, as YAML or JSON
    may give it) becomes the int; anything else (2.5, "2", True) is refused, naming the field.

    Parameters:
        > Model

        model_init_kwargs (`dict` or `None`, defaults to `None`):
            Keyword arguments for `DiffusionPipeline.from_pretrained` when `model` is a Hub id or a folder, e.g.
            `{"revision": "main", "variant": "fp16"}` (a JSON string on the command line, as in TRL). The dtype is
            not one of them: the trainer loads the frozen parts in the training dtype (bf16/fp16/float32).

        > Rollouts

        num_generations (`int`, defaults to `8`):
            Group size N: rollouts per prompt. Advantages are normalised within a group, so N ≥ 2; the paper uses 8.
        num_inference_steps (`int`, defaults to `20`):
            Denoising steps T of each rollout (the released configs use 20).
        eta (`float`, defaults to `1.0`):
            Stochasticity η of the DDIM SDE sampler, in (0, 1]: > 0 for the steps to have a log-probability, ≤ 1
            because above it DDIM's direction term √(1 − ᾱ_s − σ²) has no real value. η = 1 is DDPM's posterior
            variance, the usual choice (DDPO).
        flow_noise_level (`float`, defaults to `0.7`):
            Noise level a of the rectified-flow SDE sampler (SD3, FLUX, Wan), σ_t = a √(t/(1−t)); Flow-GRPO's value.
            Plays the role `eta` plays for DDIM models; must be > 0.
        resolution (`int` or `None`, defaults to `None`):
            Pixel resolution of rollouts and reference images. `None` uses the denoiser's native size. Must be a
            multiple of the VAE × denoiser downsampling factor; checked before any work. Square, like the reference
            data it is cropped from.
        num_frames (`int` or `None`, defaults to `None`):
            Frames per video for video pipelines (Wan); `None` uses the pipeline's default (Wan: 81). Wan's VAE
            compresses time 4×, so it must be 4k + 1; reference videos must have exactly this many frames. Ignored by
            image pipelines.
        cfg_scale (`float`, defaults to `1.0`):
            Classifier-free guidance scale w of the rollouts: the policy samples with ε_∅ + w (ε_c − ε_∅), its
            log-probabilities are those of the guided step, and training back-propagates through both branches (in
            the one denoiser forward per trained step). `1.0` turns guidance off, as the paper's runs (one branch,
            half the denoiser work); set the value you sample the model with (SD 1.5 7.5, SD3.5 Flow-GRPO 4.5, Wan 5)
            when the rewards should judge guided images. Must be in [1, 100] (`MAX_CFG_SCALE`: far beyond the
            1.5–20 models are sampled at, the guided `data_beta` explodes). The pipeline argument it matches is
            `guidance_scale` for SD/SDXL/SD3/Wan/SANA/FLUX.2 [klein], `true_cfg_scale` for FLUX.1 and Qwen-Image,
            and `guidance_scale` + 1 for Z-Image and Cosmos; families without an unconditional branch (FLUX.2 [dev])
            refuse it (docs/concepts.md).
        negative_prompt (`str` or `None`, defaults to `None`):
            The prompt of the guidance's unconditional branch, for every row (needs `cfg_scale` > 1). `None`: what the
            pipeline uses without one — the empty prompt; SDXL base: zero embeddings; FLUX: the empty prompt (its
            pipeline needs a negative prompt for true CFG).
        negative_prompt_column (`str` or `None`, defaults to `None`):
            Dataset column holding each row's negative prompt instead (not with `negative_prompt`); an eval dataset
            needs it too (its guided held-out loss uses each row's negative prompt, as rollouts do).
        data_prompt_dropout (`float` or `None`, defaults to `None`):
            Probability that a data-term sample is trained with the null conditioning (the empty prompt, as the
            pipeline encodes it without a negative prompt) instead of its prompt, drawn per sample and trained step
            from the run's seed (exact across processes and resumes). Guided sampling also follows the unconditional
            model; this anchors it to the reference data as the prompt's term anchors the conditional one. A negative
            prompt is not trained on: teaching "blurry" to mean the average data image would erase what it means.
            `None`: 0.2 when `cfg_scale` > 1 (the authors' code's text dropout), else 0. In [0, 1), and under guidance
            0 or ≥ 0.01 (`MIN_GUIDED_PROMPT_DROPOUT`: the guided `data_beta` grows as 1/p); no effect when
            `data_beta` = 0.
        guidance_scale (`float` or `None`, defaults to `None`):
            The value fed to a guidance-distilled denoiser's guidance embedding (FLUX.1-dev, FLUX.2 [dev]), in
            rollouts and in the data term alike, on both branches under `cfg_scale`; `None` uses the pipeline's
            default (FLUX.1 3.5, FLUX.2 4.0). This is not classifier-free guidance (it costs no second branch).
            Ignored by models without a guidance embedding.
        max_sequence_length (`int` or `None`, defaults to `None`):
            Prompt tokens fed to the text encoder (T5 of SD3 / FLUX.1 / Wan; the language models of Qwen-Image,
            FLUX.2, Z-Image, SANA, Cosmos); `None` uses the adapter's default (SD3 256, FLUX.1 / Wan / FLUX.2 /
            Z-Image / Cosmos 512, SANA 300, Qwen-Image 128). Always capped by the tokenizer's `model_max_length`.
        same_noise_within_group (`bool`, defaults to `False`):
            Give all rollouts of a group the same initial noise (they still differ through the per-step noise).
            Independent noise per rollout is the default, as in the reference code.
        train_step_stride (`int`, defaults to `2`):
            Train on every `train_step_stride`-th denoising step, starting at step 0 (the reference code trains 10 of
            20). The last step is never trained: it is (nearly) deterministic.
        train_step_indices (`list[int]` or `None`, defaults to `None`):
            Explicit step indices to train on (each in `[0, T-2]`); overrides `train_step_stride`.

        > Rewards and advantages

        reward_weights (`list[float]` or `None`, defaults to `None`):
            Weight of each reward function; `None` weighs all by 1. r = Σ_i w_i r_i.
        overlap_rewards (`bool`, defaults to `False`):
            Score each finished chunk of groups in a background thread while the next chunk is rolled out, so a slow
            reward (a large model, a remote `RemoteReward`) overlaps generation instead of stalling it. Results are
            identical to `overlap_rewards=False` with the same `rollout_chunk_groups`: only the timing changes. This
            is not about `async def` reward functions, which always run concurrently with each other
            (docs/rewards.md).
        rollout_chunk_groups (`int` or `None`, defaults to `None`):
            Groups rolled out together. `None` rolls out the whole batch at once (the most parallel rollout), or one
            group at a time when `overlap_rewards` is on. Chunking changes how the seeded noise is drawn, not its
            distribution.
        multi_objective_aggregation (`str`, defaults to `"sum_then_normalize"`):
            How several reward functions combine, as TRL's `GRPOConfig`: `"sum_then_normalize"` sums the weighted
            rewards, then normalises the sum (`scale_rewards`); `"normalize_then_sum"` first normalises each reward
            within its group, then sums them with `reward_weights` and normalises the sum by the batch std, so that a
            reward on a large scale (JPEG bytes) does not drown one on a small scale (a probability). With one reward
            both are the same up to the final scale.
        reward_clip (`float` or `None`, defaults to `None`):
            Clip the combined reward to ±`reward_clip` before group normalisation (the reference code uses 5 on its
            rewards' scale). Off by default: common rewards live on other scales (aesthetic scores ~5–7, JPEG sizes in
            kB), where a fixed clip would flatten every group; group normalisation makes the scale irrelevant anyway.
            Set it (> 0) to cap outliers of a reward whose range you know.
        scale_rewards (`str`, defaults to `"group"`):
            Divide centred rewards by the group std (`"group"`), the batch std (`"batch"`) or nothing (`"none"`).
            The group std approximates the temperature β of the DDRL objective.
        exp_advantage (`bool`, defaults to `False`):
            Apply the objective's λ-transform A ← −exp(−A) (the reference code's `exp_reward`; off in its configs).
        advantage_clip (`float`, defaults to `5.0`):
            Advantages are clamped to ±`advantage_clip` (> 0).

        > Loss

        num_iterations (`int`, defaults to `1`):
            Optimiser steps on each rollout batch (GRPO's `num_iterations`, DDPO's inner epochs). 1 is on-policy: the
            ratio is 1 up to numerics and `epsilon` never clips. With μ > 1 the same rollouts, their recorded
            log-probs and advantages serve μ consecutive optimiser steps (the same prompts, the same data-term noise);
            from the second one the policy has moved, the ratio leaves 1 and `epsilon` clips it. μ times fewer
            rollouts per step; checkpoints taken between the iterations hold the rollout batch, so resuming there is
            exact.
        epsilon (`float`, defaults to `1e-4`):
            PPO clip range ε of the ratio (the reference code's and DDPO's value). With `num_iterations=1` the ratio is
            1 up to numerics; `ratio/mean` and `clip_fraction` are logged to show it. With more iterations ε decides
            how far each sample may pull the policy from the rollout's: 1e-4 clips nearly every sample after the
            first step, so raise it (e.g. 1e-3 to 1e-2) when reusing rollouts.
        data_beta (`float` or `None`, defaults to `None`):
            Weight of the data term (the diffusion loss on the paired reference samples), the forward-KL anchor of
            DDRL. `None` resolves it (`default_data_beta`): 0.3 unguided, and under guidance (`cfg_scale` = w > 1)
            0.15 · F(w, p) with F = w²/(1−p) + (w−1)²/p (p = `data_prompt_dropout`, 0.2), how much guidance
            amplifies the policy's moves against the anchor: 1.5 at w = 2, 13 at w = 4.5. The released configs use
            0.01 with a log-prob that drops the Gaussian's 1/(2σ²); ours keeps it and averages over latent
            dimensions, which scales the policy gradient differently, so both values are calibrated on the embedded
            digits benchmark (docs/concepts.md): unguided, 0.3 keeps the held-out diffusion-loss ratio below 1.10
            while the reward rises; guided at w = 2, 0.3 hacked, 1.0 let the judge slip from step 70 and 1.5 held
            it. `0` gives plain GRPO (reward hacking). A guided value under the default warns. At most 1e6
            (`MAX_DATA_BETA`), set or resolved: beyond it the reward's gradient is lost in float32 rounding.
        target_loss_ratio (`float` or `None`, defaults to `None`):
            Adapt `data_beta` during training to hold the data term's diffusion-loss ratio to the base model at this
            target (> 1, e.g. 1.05), as PPO's adaptive KL coefficient (docs/concepts.md, "Adaptive data_beta"):
            `data_beta` is the starting value, and β moves by at most a factor e^`data_beta_adapt_rate` per optimiser
            step within [data_beta / 100, 100 · data_beta]. The signal, logged every step as
            `data_beta/loss_ratio` next to `data_beta`, is the policy's loss on each step's noised references over
            the base model's on the same inputs (one extra no-grad forward of the data rows; with full fine-tuning
            a frozen copy of the base denoiser is kept for it). The controller's state is checkpointed. `None`
            keeps `data_beta` fixed. Experimental: measured on the digits benchmark, not yet everywhere.
        data_beta_adapt_rate (`float`, defaults to `0.05`):
            The adaptive controller's largest change of log(data_beta) per optimiser step (η), in (0, 1].
        data_noise (`str`, defaults to `"rollout"`):
            Noise ε of the data term: `"rollout"` reuses the initial noise of the group's first rollout (the code's
            `use_rl_sigma_and_noise`), `"random"` draws fresh noise.
        data_timesteps (`str`, defaults to `"rollout"`):
            Noise level of the data term: `"rollout"`, the timestep of each trained step; `"random"`, a uniformly
            random training timestep per sample (the paper's formulation).
        data_on_first_step_only (`bool`, defaults to `False`):
            Add the data term only at the first trained step (the code's `data_on_first_only`); cheaper, weaker.
        kl_beta (`float`, defaults to `0.0`):
            Weight of the optional reverse KL to the frozen base policy, mean ‖μ_θ − μ_ref‖² / (2σ²). 0 in DDRL.
            With LoRA the base is the denoiser with its adapter disabled (no copy); with full fine-tuning a frozen
            copy of the denoiser is kept in memory.

        > Data

        prompt_column (`str`, defaults to `"prompt"`):
            Dataset column with the text prompt.
        reference_column (`str` or `None`, defaults to `None`):
            Dataset column with each prompt's paired reference sample: an image (PIL image, path, bytes or array), or
            for video pipelines a video (frames, an array or a file). `None`: the column named `"image"`, else the one
            named `"video"`. Samples are resized and centre-cropped to `resolution` and VAE-encoded once, before
            training.
        preprocess_batch_size (`int`, defaults to `16`):
            Batch size of that one-off VAE encoding.
        max_reference_upscale (`float`, defaults to `2.0`):
            How far a reference image or video may be upscaled to reach `resolution` (the ratio of `resolution` to its
            short side). Upscaled references anchor the model to blur: any upscaling is reported in one warning per
            dataset, and a sample needing more than this factor is refused, naming the row. `1.0` refuses all
            upscaling.

        > Runs and safety

        overwrite_output_dir (`bool`, defaults to `False`):
            Allow a new run in an `output_dir` that already holds another run's checkpoints or saved weights; its
            `checkpoint-*` folders are deleted when training starts. Without it such a run is refused before any work
            (resume the earlier run with `resume_from_checkpoint`, or pick another `output_dir`), so no saved work is
            overwritten by accident.
        max_consecutive_nonfinite_steps (`int`, defaults to `3`):
            An optimiser step whose loss or gradients are not finite (NaN, ±inf) is skipped: the weights and optimiser
            state stay as they were, a warning is logged and `nonfinite_steps` counts it (the step still counts toward
            `max_steps`, and the LR schedule advances). After this many skipped steps in a row training stops with an
            error, so a run that has diverged does not go on writing checkpoints.

        > Evaluation and logging

        eval_noise_draws (`int`, defaults to `4`):
            Noise draws per held-out sample in `evaluate()`. Draws are seeded and identical across evaluations, so
            `eval_diffusion_loss_ratio` against the base model compares like with like.
        ema_decay (`float` or `None`, defaults to `None`):
            Keep an exponential moving average of the trained weights (LoRA or full) with this decay, as diffusers'
            training scripts' `--use_ema` (diffusers' `EMAModel`, e.g. 0.999). Checkpoints hold it and resume restores
            it; the final `save_model` writes the EMA weights. `None`: off.

        validation_prompts (`list[str]` or `None`, defaults to `None`):
            Fixed prompts sampled at every `evaluate()`, every `validation_steps` steps and at the end of training,
            `validation_images_per_prompt` each, with the policy's sampler (guided as the rollouts) and the same seeded
            noise every time, so the grid shows the model's drift (docs/metrics.md). The samples are scored by the
            trained rewards and the trainer's `eval_reward_funcs` (`eval_rewards/<name>`), measured for within-prompt
            diversity (`eval_diversity`, `eval_diversity_ratio` to the base model's), written to
            `output_dir/validation/step-N.png`, sent to the trackers (tag `validation`) and shown in the model card.
            `None`: the prompts of the first `num_validation_prompts` rows of the eval dataset (their columns go to
            the rewards). A single string is one prompt (as a YAML scalar `validation_prompts: a red cat` is); blank
            prompts are refused.
        num_validation_prompts (`int`, defaults to `0`):
            Eval-dataset rows whose prompts (and columns) are the validation prompts when `validation_prompts` is
            None, e.g. 4; `0`: no validation unless `validation_prompts` is set.
        validation_images_per_prompt (`int`, defaults to `4`):
            Samples per validation prompt (≥ 2: diversity is measured within a prompt).
        validation_steps (`int` or `None`, defaults to `None`):
            Also sample the validation grid every that many optimiser steps, with or without an eval dataset; `None`:
            only with each `evaluate()` and at the end of training.
        log_sample_images_steps (`int`, defaults to `50`):
            Every that many optimiser steps (steps k, 2k, ...), a grid of that step's rollout images goes to the
            trackers in `report_to` (TensorBoard, W&B) at the step's own number (the step whose training log shows
            their rewards), one row per prompt with the prompt written above it. `0` turns it off.
        num_sample_images (`int`, defaults to `8`):
            Images in that grid.
    """

    # Model
    model_init_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments for DiffusionPipeline.from_pretrained (JSON)."}
    )
    # Rollouts
    num_generations: int = field(default=8, metadata={"help": "Group size N: rollouts per prompt (≥ 2)."})
    num_inference_steps: int = field(default=20, metadata={"help": "Denoising steps T per rollout."})
    eta: float = field(default=1.0, metadata={"help": "DDIM stochasticity η in (0, 1]."})
    flow_noise_level: float = field(default=0.7, metadata={"help": "Rectified-flow SDE noise level a > 0."})
    resolution: int | None = field(default=None, metadata={"help": "Pixel resolution; None = denoiser's native."})
    num_frames: int | None = field(default=None, metadata={"help": "Video frames (4k+1 for Wan); None = default."})
    cfg_scale: float = field(default=1.0, metadata={"help": "Classifier-free guidance scale of rollouts; 1 = off."})
    negative_prompt: str | None = field(default=None, metadata={"help": "Negative prompt of the guidance."})
    negative_prompt_column: str | None = field(default=None, metadata={"help": "Column of per-row negative prompts."})
    data_prompt_dropout: float | None = field(
        default=None, metadata={"help": "Data-term prompt dropout; None = 0.2 under CFG, else 0."}
    )
    guidance_scale: float | None = field(
        default=None,
        metadata={"help": "Distilled guidance embedding value (FLUX.1-dev, FLUX.2 [dev]); None = the pipeline's."},
    )
    max_sequence_length: int | None = field(
        default=None, metadata={"help": "Prompt tokens of the text encoder; None = the family's default."}
    )
    same_noise_within_group: bool = field(default=False, metadata={"help": "Share initial noise within a group."})
    train_step_stride: int = field(default=2, metadata={"help": "Train every k-th denoising step."})
    train_step_indices: list[int] | None = field(default=None, metadata={"help": "Explicit trained step indices."})
    # Rewards and advantages
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weights of the reward functions."})
    overlap_rewards: bool = field(default=False, metadata={"help": "Score chunk k while chunk k+1 is rolled out."})
    rollout_chunk_groups: int | None = field(default=None, metadata={"help": "Groups per rollout chunk; None = all."})
    multi_objective_aggregation: str = field(
        default="sum_then_normalize", metadata={"help": "'sum_then_normalize' or 'normalize_then_sum'."}
    )
    reward_clip: float | None = field(default=None, metadata={"help": "Clip rewards to ±this; None = off."})
    scale_rewards: str = field(default="group", metadata={"help": "'group', 'batch' or 'none'."})
    exp_advantage: bool = field(default=False, metadata={"help": "λ-transform A ← −exp(−A)."})
    advantage_clip: float = field(default=5.0, metadata={"help": "Clamp advantages to ±this."})
    # Loss
    num_iterations: int = field(default=1, metadata={"help": "Optimiser steps on each rollout batch."})
    epsilon: float = field(default=1e-4, metadata={"help": "PPO clip range of the ratio."})
    data_beta: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the data (diffusion) term; None = 0.3, or more under guidance (docs/concepts.md)."
        },
    )
    target_loss_ratio: float | None = field(
        default=None, metadata={"help": "Adapt data_beta to hold the data loss ratio here (e.g. 1.05); None = fixed."}
    )
    data_beta_adapt_rate: float = field(
        default=0.05, metadata={"help": "Largest change of log(data_beta) per step when adaptive."}
    )
    data_noise: str = field(default="rollout", metadata={"help": "'rollout' or 'random' noise for the data term."})
    data_timesteps: str = field(default="rollout", metadata={"help": "'rollout' or 'random' data noise level."})
    data_on_first_step_only: bool = field(
        default=False, metadata={"help": "Data term at the first trained step only."}
    )
    kl_beta: float = field(default=0.0, metadata={"help": "Weight of the reverse KL to the base policy."})
    # Data
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt column."})
    reference_column: str | None = field(
        default=None, metadata={"help": "Paired reference image/video column; None: 'image', else 'video'."}
    )
    preprocess_batch_size: int = field(default=16, metadata={"help": "Batch size of the one-off VAE encoding."})
    max_reference_upscale: float = field(
        default=2.0, metadata={"help": "Largest upscaling factor of a reference sample to `resolution`."}
    )
    # Runs and safety
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start a new run in an output_dir holding another run's checkpoints."}
    )
    max_consecutive_nonfinite_steps: int = field(
        default=3, metadata={"help": "Stop after this many skipped non-finite steps in a row."}
    )
    # Evaluation and logging
    ema_decay: float | None = field(default=None, metadata={"help": "EMA decay of the trained weights; None = off."})
    eval_noise_draws: int = field(default=4, metadata={"help": "Seeded noise draws per eval sample."})
    validation_prompts: list[str] | None = field(
        default=None, metadata={"help": "Fixed validation prompts; None = the first eval-dataset rows'."}
    )
    num_validation_prompts: int = field(default=0, metadata={"help": "Eval rows used as validation prompts."})
    validation_images_per_prompt: int = field(default=4, metadata={"help": "Validation samples per prompt (≥ 2)."})
    validation_steps: int | None = field(
        default=None, metadata={"help": "Sample the validation grid every k steps; None = at evaluations and the end."}
    )
    log_sample_images_steps: int = field(default=50, metadata={"help": "Log a rollout image grid every k steps."})
    num_sample_images: int = field(default=8, metadata={"help": "Images in the logged grid."})

    # TrainingArguments defaults changed to the released DDRL configs / TRL conventions
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (reference: 1e-5)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (reference: 1e-4)."})
    adam_beta2: float = field(default=0.99, metadata={"help": "AdamW β₂ (reference: 0.99)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every k steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: extra dataset columns are passed to reward functions."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's find_unused_parameters. False: every trained step's forward uses every trained weight, so "
            "DDP need not search the graph for unused ones each iteration (True costs that search and warns on "
            "every process); set True only for a denoiser whose trained weights some forwards skip."
        },
    )

    def __post_init__(self):
        self._check_numbers_are_finite()  # before anything compares them: every comparison with NaN is False
        self._check_integer_fields()  # before anything counts with them: num_iterations=2.5 fails much later
        self._read_model_init_kwargs()
        too_large = [w for w in self.reward_weights or [] if abs(w) > torch.finfo(torch.float32).max]
        if too_large:
            raise ValueError(f"reward_weights must fit in float32 (|w| ≤ 3.4e38), got {too_large}.")
        super().__post_init__()
        for name, valid, message in _RANGE_CHECKS:
            value = getattr(self, name)
            if not valid(value):
                raise ValueError(message.format(value=value, name=name))
        self._check_batch_layout()
        self._resolve_data_beta()
        self._check_combinations()
        if isinstance(self.validation_prompts, str):  # one prompt (a YAML scalar), never a string of 1-char prompts
            self.validation_prompts = [self.validation_prompts]
        if self.validation_prompts is not None:
            self.validation_prompts = _checked_prompts(self.validation_prompts)
        _ = self.resolved_train_step_indices  # raises on invalid explicit indices
        if self.dataloader_pin_memory and self.device.type == "cpu":
            # pinning needs an accelerator (torch warns otherwise); the batches here are prompts and small latents
            self.dataloader_pin_memory = False

    def _read_model_init_kwargs(self) -> None:
        """`model_init_kwargs` as a dict (a JSON string on the command line), without a dtype of its own."""
        if isinstance(self.model_init_kwargs, str):
            try:
                self.model_init_kwargs = json.loads(self.model_init_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"model_init_kwargs must be a JSON object, got {self.model_init_kwargs!r} ({err})."
                ) from err
        if self.model_init_kwargs is not None and not isinstance(self.model_init_kwargs, dict):
            raise ValueError(f"model_init_kwargs must be a dict, got {type(self.model_init_kwargs).__name__}.")
        if "torch_dtype" in (self.model_init_kwargs or {}) or "dtype" in (self.model_init_kwargs or {}):
            raise ValueError(
                "model_init_kwargs must not set the dtype: the trainer loads the frozen parts in the "
                "training dtype; use bf16=True or fp16=True."
            )

    def _check_batch_layout(self) -> None:
        """The processes transformers set up are the ones launched, and a micro-step holds whole groups."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.world_size == 1:
            raise ValueError(
                f"Launched as one of {launched} processes (WORLD_SIZE={launched}) but transformers set up a "
                f"single-process run, so every process would train alone on the same data. Without GPUs, pass "
                f"use_cpu=True (--use_cpu) to train on {launched} CPU processes over gloo."
            )
        global_batch = self.per_device_train_batch_size * self.world_size
        if global_batch % self.num_generations:
            suggestion = self.num_generations * max(1, self.per_device_train_batch_size // self.num_generations)
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) × {self.world_size} process(es) = "
                f"{global_batch} rollouts per micro-step, not a multiple of num_generations ({self.num_generations}): "
                f"groups would be cut. E.g. set per_device_train_batch_size={suggestion}."
            )

    def _resolve_data_beta(self) -> None:
        """`data_beta` unset → its default for the guidance used (`default_data_beta`), bounded; warnings for a data
        term that guidance outgrows."""
        if self.cfg_scale > 1 and self.data_prompt_dropout and self.data_prompt_dropout < MIN_GUIDED_PROMPT_DROPOUT:
            raise ValueError(
                f"data_prompt_dropout={self.data_prompt_dropout:g} under guidance (cfg_scale={self.cfg_scale:g}) "
                f"must be 0 or ≥ {MIN_GUIDED_PROMPT_DROPOUT:g}: the guided data_beta grows as 1/data_prompt_dropout "
                f"(so few unconditional samples hold the unconditional branch to nothing anyway). Leave it unset "
                f"(0.2 under guidance)."
            )
        guided_default = default_data_beta(self.cfg_scale, self.data_prompt_dropout)
        if self.cfg_scale > 1 and self.data_prompt_dropout == 0 and self.data_beta != 0:
            warnings.warn(
                f"cfg_scale={self.cfg_scale:g} with data_prompt_dropout=0: the data term never trains the "
                "unconditional branch that guidance follows, so nothing holds it to the data (docs/concepts.md). "
                "Leave data_prompt_dropout unset (0.2 under guidance).",
                stacklevel=4,
            )
        if self.data_beta is None:
            if guided_default > MAX_DATA_BETA:
                raise ValueError(
                    f"cfg_scale={self.cfg_scale:g} with data_prompt_dropout="
                    f"{self.data_prompt_dropout or GUIDED_PROMPT_DROPOUT:g} resolves the default data_beta to "
                    f"{guided_default:.3g}, above its maximum {MAX_DATA_BETA:g}: lower cfg_scale, leave "
                    f"data_prompt_dropout unset (0.2), or set data_beta yourself."
                )
            self.data_beta = guided_default
        elif self.cfg_scale > 1 and 0 < self.data_beta < guided_default:
            warnings.warn(
                f"cfg_scale={self.cfg_scale:g} with data_beta={self.data_beta:g}, under the guided default "
                f"{guided_default:.3g} (data_beta=None): guidance amplifies the policy's changes. On the digits "
                "benchmark (docs/concepts.md) rollouts guided at w = 2 hacked the reward with data_beta 0.3 (judge "
                "accuracy 1.00 → 0.10) while the conditional held-out ratio stayed under 1.08, and 1.0 let the judge "
                "slip from step 70; the default 1.5 held it. Leave data_beta unset, and watch "
                "eval_guided_diffusion_loss_ratio and what the rewards judge.",
                stacklevel=4,
            )

    def _check_combinations(self) -> None:
        """Settings that are each valid but not together."""
        if self.negative_prompt is not None and self.negative_prompt_column is not None:
            raise ValueError(
                "negative_prompt and negative_prompt_column are both set: give one negative prompt for every row, or "
                "a column of them, not both."
            )
        if (self.negative_prompt is not None or self.negative_prompt_column is not None) and self.cfg_scale == 1:
            raise ValueError(
                "A negative prompt is set but guidance is off: it is the unconditional branch of classifier-free "
                "guidance; set cfg_scale > 1 (e.g. 4.5) or drop the negative prompt."
            )
        if self.target_loss_ratio is not None and self.data_beta == 0:
            raise ValueError(
                "target_loss_ratio adapts data_beta from its starting value, but data_beta=0 turns the data term "
                "off: leave data_beta unset (or > 0) to adapt it, or drop target_loss_ratio."
            )
        if self.validation_prompts is not None and self.negative_prompt_column is not None:
            raise ValueError(
                "validation_prompts have no negative_prompt_column values for the guidance's unconditional "
                "branch: leave validation_prompts unset to validate on eval-dataset rows, or use negative_prompt."
            )

    def _check_integer_fields(self) -> None:
        """Refuse a non-integer in every field annotated `int` (or `list[int]`), naming the field; an integral float
        (2.0, as YAML or JSON may give it) becomes the int."""
        for spec in fields(self):
            kind, value = _integer_kind(spec), getattr(self, spec.name, None)
            if kind is None or value is None:
                continue
            if kind == "int":
                number = _as_integer(value)
                if number is None:
                    raise ValueError(
                        f"{spec.name} must be a whole number (an int; 2.0 is taken as 2), got {value!r}. See "
                        f"docs/config.md for the field's range."
                    )
                setattr(self, spec.name, number)
                continue
            items = list(value) if isinstance(value, (list, tuple)) else None
            numbers_ = [_as_integer(item) for item in items] if items is not None else None
            if numbers_ is None or None in numbers_:
                raise ValueError(f"{spec.name} must be a list of whole numbers (ints), got {value!r}.")
            setattr(self, spec.name, numbers_)

    def _check_numbers_are_finite(self) -> None:
        """Refuse NaN and ±inf in every number of the config (reward weights included), naming the field."""
        for spec in fields(self):
            value = getattr(self, spec.name, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            for item in values:
                if isinstance(item, numbers.Real) and not isinstance(item, bool) and not math.isfinite(item):
                    raise ValueError(
                        f"{spec.name} must be a finite number, got {value!r}. NaN and infinity are never valid "
                        f"settings; see docs/config.md for the field's range."
                    )

    @property
    def groups_per_optimizer_step(self) -> int:
        """Prompts (groups) per optimiser step, over all processes and accumulated micro-steps."""
        rows = self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps
        return rows // self.num_generations

    @property
    def resolved_data_prompt_dropout(self) -> float:
        """The data term's prompt dropout as used: `data_prompt_dropout`, or 0.2 under guidance and 0 without; 0 when
        there is no data term (`data_beta` = 0)."""
        if self.data_beta == 0:
            return 0.0
        if self.data_prompt_dropout is not None:
            return self.data_prompt_dropout
        return GUIDED_PROMPT_DROPOUT if self.cfg_scale > 1 else 0.0

    @property
    def resolved_rollout_chunk_groups(self) -> int | None:
        """Groups per rollout chunk, as used: `rollout_chunk_groups`, or 1 with `overlap_rewards`, else None (all)."""
        if self.rollout_chunk_groups is not None:
            return self.rollout_chunk_groups
        return 1 if self.overlap_rewards else None

    @property
    def resolved_train_step_indices(self) -> list[int]:
        """The denoising-step indices that get a loss and a backward pass, sorted: `train_step_indices` if given, else
        every `train_step_stride`-th step but the last."""
        last_trainable = self.num_inference_steps - 2
        if self.train_step_indices is not None:
            indices = sorted(set(int(i) for i in self.train_step_indices))
            bad = [i for i in indices if not 0 <= i <= last_trainable]
            if bad or not indices:
                raise ValueError(
                    f"train_step_indices must be a non-empty list of step indices in [0, {last_trainable}] "
                    f"(num_inference_steps={self.num_inference_steps}; the last step is never trained), got "
                    f"{self.train_step_indices}."
                )
            return indices
        return list(range(0, last_trainable + 1, self.train_step_stride))
