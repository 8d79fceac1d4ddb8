"""A real, tiny text-to-image base model: a Stable Diffusion pipeline trained on scikit-learn's handwritten digits.

scikit-learn ships 1,797 real 8×8 handwritten digits inside its wheel (`sklearn.datasets.load_digits`), so this
demo needs no download. From them we build, on a laptop CPU in about a minute and a half:

* `build_digits_pipeline`: a complete `StableDiffusionPipeline` (tiny `AutoencoderKL` 16×16×3 → 8×8×4, a
  prompt-conditional `UNet2DConditionModel`, a frozen tiny `CLIPTextModel` with a word tokenizer, and a
  `DDIMScheduler`) that draws the digit named in prompts such as ``"a handwritten digit seven"``. It is sampled with
  stochastic DDIM (η = 1) in 10–20 steps, as RL post-training samples it; trained with 10 % prompt dropout, it
  also has an unconditional branch (the empty prompt), so classifier-free guidance works on it.
* `DigitsEvaluator`: an independent judge, a logistic regression fitted on the real training digits, which says
  whether a sample shows the prompted digit.
* `ink_reward`: a deliberately hackable reward (more ink scores higher) that RL can over-optimise, destroying the
  digits, unless something such as DDRL's data term holds the model to the real data.

`python -m ddrl_trl.demo.digits --build ddrl_trl/demo/assets/digits-sd` rebuilds the shipped weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import shutil
import tempfile
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

from ..testing import assemble_sd_pipeline, build_word_tokenizer, tiny_unet
from ..testing.components import clip_text_encoder

__all__ = [
    "ASSET_DIR",
    "DIGIT_WORDS",
    "DigitsEvaluator",
    "DigitsSampling",
    "DigitsTraining",
    "build_digits_pipeline",
    "digit_prompt",
    "digits_dataset",
    "evaluate_digits_pipeline",
    "ink_reward",
    "judge_reward",
    "load_digits_pipeline",
    "prompt_label",
]

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SIZE = 16  # pixels; each 8×8 digit pixel becomes a 2×2 block
#: Where the shipped (package data) pipeline lives.
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "digits-sd"
#: Where the pipeline is built when the shipped copy is missing.
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddrl_trl" / "digits-sd"
_SPLIT_SEED = 0


# ----------------------------------------------------------------------------------------------------------- data
def digit_prompt(label: int) -> str:
    """The prompt for a digit class, e.g. ``digit_prompt(7) == "a handwritten digit seven"``."""
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


def prompt_label(prompt: str) -> int:
    """The digit a prompt asks for (the first digit word in it); raises ``ValueError`` if it names none."""
    for word in prompt.lower().split():
        if word in DIGIT_WORDS:
            return DIGIT_WORDS.index(word)
    raise ValueError(f"prompt {prompt!r} names no digit (expected one of {DIGIT_WORDS})")


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """All 1,797 digits (N, 8, 8) in 0..16, their labels, and a fixed stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=_SPLIT_SEED)
    return digits.images.astype(np.float32), digits.target.astype(np.int64), {"train": train, "test": test}


def _split(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels, splits = _digits()
    if split not in splits:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return images[splits[split]], labels[splits[split]]


def _to_pixels(images8: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) digits in 0..16 → (N, 3, 16, 16) float images in [0, 1], white ink on black.

    Values are quantised to uint8 levels so tensors used for training equal the dataset's PIL images exactly.
    """
    x = torch.from_numpy(np.round(images8 / 16.0 * 255.0) / 255.0).float()
    x = x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def digits_dataset(split: str):
    """The real digits as a ``datasets.Dataset`` with columns ``prompt`` (str), ``image`` (16×16 RGB PIL) and
    ``label`` (int). ``split`` is ``"train"`` (1,437 digits) or ``"test"`` (360 held-out digits); the split is
    stratified by class and fixed."""
    from datasets import ClassLabel, Dataset, Features, Image, Value
    from PIL import Image as PILImage

    images8, labels = _split(split)
    pixels = (_to_pixels(images8) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    features = Features({"prompt": Value("string"), "image": Image(), "label": ClassLabel(names=DIGIT_WORDS)})
    return Dataset.from_dict(
        {
            "prompt": [digit_prompt(y) for y in labels],
            "image": [PILImage.fromarray(np.ascontiguousarray(p)) for p in pixels],
            "label": labels.tolist(),
        },
        features=features,
    )


# ------------------------------------------------------------------------------------------------ judge and reward
class DigitsEvaluator:
    """An independent digit judge: a logistic regression fitted on the real train-split digits at 8×8.

    It never sees generated images during fitting, so its accuracy on samples measures whether they look like real
    digits of the prompted class, a quantity the ink reward does not know about.
    """

    def __init__(self, max_iter: int = 2000):
        from sklearn.linear_model import LogisticRegression

        images8, labels = _split("train")
        # Features in 0..1 (digits / 16) keep lbfgs well conditioned; L2 regularisation keeps weights on the
        # always-blank border pixels small, so stray ink there does not dominate a prediction.
        self.classifier = LogisticRegression(max_iter=max_iter)
        self.classifier.fit(images8.reshape(len(images8), -1) / 16.0, labels)

    @staticmethod
    def _features(images: torch.Tensor) -> np.ndarray:
        """(B, C, H, W) images in [0, 1] → (B, 64): grey, area-downsampled to 8×8."""
        grey = images.detach().float().cpu().clamp(0, 1).mean(dim=1, keepdim=True)
        return F.adaptive_avg_pool2d(grey, (8, 8)).flatten(1).numpy()

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Predicted digit for each image of a float tensor ``(B, 3, H, W)`` in [0, 1]."""
        return self.classifier.predict(self._features(images))

    def accuracy(self, images: torch.Tensor, labels) -> float:
        """Fraction of ``images`` (float ``(B, 3, H, W)`` in [0, 1]) classified as their ``labels`` (ints)."""
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        return float((self.predict(images) == labels).mean())

    def test_accuracy(self) -> float:
        """Accuracy on the 360 real held-out digits, through the same 16×16 image path as samples."""
        images8, labels = _split("test")
        return self.accuracy(_to_pixels(images8), labels)


def ink_reward(images: torch.Tensor, prompts: list[str], **kwargs) -> list[float]:
    """Mean brightness (amount of white ink) of each image, a float tensor ``(B, 3, H, W)`` in [0, 1].

    Deliberately hackable: a blob of ink scores higher than any real digit, so maximising it alone destroys the
    digits (watch `DigitsEvaluator`'s accuracy fall).
    """
    return images.detach().float().mean(dim=(1, 2, 3)).tolist()


ink_reward.__name__ = "ink"


def judge_reward(evaluator: DigitsEvaluator):
    """An evaluation reward (not trained on) from the judge: 1.0 for each image it reads as the prompted digit, else
    0.0; its mean over samples is the judge's accuracy. Named ``judge``."""

    def judge(images: torch.Tensor, prompts: list[str], **kwargs) -> list[float]:
        labels = [prompt_label(p) for p in prompts]
        return (evaluator.predict(images) == np.asarray(labels)).astype(float).tolist()

    return judge


# ---------------------------------------------------------------------------------------------------------- build
@dataclass(frozen=True)
class DigitsTraining:
    """How `build_digits_pipeline` trains the base model: the steps of each stage (of ``batch_size`` samples), the
    denoiser's peak AdamW learning rate (warm-up, then cosine decay to 0), and the probability that a training sample
    is conditioned on the empty prompt."""

    vae_steps: int = 200
    unet_steps: int = 800
    batch_size: int = 64
    unet_lr: float = 4e-3
    prompt_dropout: float = 0.1


#: What the denoiser trains on: each training digit's VAE posterior mean and std (latents are scaled by `scale`), its
#: label, and the frozen text encoder's embeddings of the ten class prompts and of the empty prompt.
_DenoiserData = namedtuple("_DenoiserData", "latent_mean latent_std scale labels class_embeds empty_embeds")


def _adamw_cosine(model: torch.nn.Module, lr: float, total_steps: int, warmup: int = 50):
    """AdamW without weight decay on ``model``'s parameters, and its schedule: linear warm-up, cosine decay to 0."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)),
    )


def _optimizer_step(optimizer: torch.optim.Optimizer, lr_schedule, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    lr_schedule.step()


def _digits_vae() -> AutoencoderKL:
    """A tiny two-block ``AutoencoderKL``: 16×16×3 images ↔ 8×8×4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,  # an 8×8×4 latent of a 2×2-block digit needs no global attention
    )


def _train_vae(x: torch.Tensor, seed: int, training: DigitsTraining, generator: torch.Generator, log):
    """Stage (a): train `_digits_vae` on the images ``x`` in [-1, 1] (reconstruction + small KL), freeze it and set
    its ``scaling_factor`` so scaled latents have unit std. Returns the VAE and the posterior mean and std of every
    image of ``x``."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    vae = _digits_vae()
    optimizer, lr_schedule = _adamw_cosine(vae, 2e-3, training.vae_steps)
    for step in range(training.vae_steps):
        batch = x[torch.randint(0, len(x), (training.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).mean()
        loss = F.mse_loss(recon, batch) + 1e-3 * kl  # small KL: smooth, bounded latents the UNet can model
        _optimizer_step(optimizer, lr_schedule, loss)
        if step % 100 == 0 or step == training.vae_steps - 1:
            log(f"vae  step {step:4d}  mse {F.mse_loss(recon, batch).item():.4f}  kl {kl.item():.3f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        scale = 1.0 / float(posterior.sample(generator).std())
    vae.register_to_config(scaling_factor=scale)
    log(f"vae  done in {time.perf_counter() - start:.1f}s, scaling_factor {scale:.4f}")
    return vae, posterior.mean, posterior.std


def _prompt_embeddings(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states of ``prompts``, padded as the pipeline pads them: what it feeds the
    UNet."""
    ids = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    return text_encoder(ids).last_hidden_state


def _frozen_text_encoder(seed: int):
    """The conditioning: a word tokenizer and a frozen, randomly initialised tiny CLIP text encoder (the UNet's
    cross-attention learns to read it). Returns both and the embeddings of the ten class prompts, (10, 16, 32), and
    of the empty prompt, the pipeline's unconditional input, (1, 16, 32)."""
    tokenizer = build_word_tokenizer(["a", "handwritten", "digit", *DIGIT_WORDS], model_max_length=16)
    torch.manual_seed(seed + 1)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32).requires_grad_(False)
    with torch.no_grad():
        class_embeds = _prompt_embeddings(tokenizer, text_encoder, [digit_prompt(d) for d in range(10)])
        empty_embeds = _prompt_embeddings(tokenizer, text_encoder, [""])
    return tokenizer, text_encoder, class_embeds, empty_embeds


def _digits_scheduler() -> DDIMScheduler:
    """Linear DDPM betas keep ᾱ at t=999 at ~4e-5 (pure noise) without the near-zero ᾱ of a capped cosine, which
    would blow up ε→x0 at the first step; "trailing" spacing makes short samplers start at t=999."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        timestep_spacing="trailing",
        prediction_type="epsilon",
    )


def _denoiser_loss(unet, data: _DenoiserData, alphas_cumprod, training: DigitsTraining, generator) -> torch.Tensor:
    """The ε-prediction loss on one batch, ``training.prompt_dropout`` of it conditioned on the empty prompt."""
    idx = torch.randint(0, len(data.labels), (training.batch_size,), generator=generator)
    # Fresh posterior samples every step: SD's recipe, and a cheap augmentation for 1,437 images.
    noise0 = torch.randn(data.latent_mean[idx].shape, generator=generator)
    z0 = (data.latent_mean[idx] + data.latent_std[idx] * noise0) * data.scale
    t = torch.randint(0, 1000, (training.batch_size,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * z0 + (1 - a).sqrt() * noise
    dropped = (torch.rand(training.batch_size, generator=generator) < training.prompt_dropout).view(-1, 1, 1)
    embeds = torch.where(dropped, data.empty_embeds, data.class_embeds[data.labels[idx]])
    pred = unet(noisy, t, encoder_hidden_states=embeds).sample
    return F.mse_loss(pred, noise)


def _train_denoiser(data: _DenoiserData, scheduler, seed: int, training: DigitsTraining, generator, log):
    """Stage (b): train an ε-prediction `tiny_unet` (~0.8 M parameters) on the VAE's latents; returns it in eval mode
    with the EMA of its weights loaded."""
    start = time.perf_counter()
    torch.manual_seed(seed + 2)
    unet = tiny_unet(IMAGE_SIZE // 2, norm_num_groups=8)
    ema = [p.detach().clone() for p in unet.parameters()]
    optimizer, lr_schedule = _adamw_cosine(unet, training.unet_lr, training.unet_steps)
    for step in range(training.unet_steps):
        loss = _denoiser_loss(unet, data, scheduler.alphas_cumprod, training, generator)
        _optimizer_step(optimizer, lr_schedule, loss)
        decay = min(0.995, (1 + step) / (10 + step))  # EMA with warm-up: averages the noisy end of training
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1 - decay)
        if step % 100 == 0 or step == training.unet_steps - 1:
            log(f"unet step {step:4d}  loss {loss.item():.4f}")
    with torch.no_grad():
        for p, e in zip(unet.parameters(), ema):
            p.copy_(e)
    unet.eval()
    log(f"unet done in {time.perf_counter() - start:.1f}s ({sum(p.numel() for p in unet.parameters()):,} params)")
    return unet


def build_digits_pipeline(
    output_dir: str | os.PathLike | None = None,
    seed: int = 0,
    training: DigitsTraining | None = None,
    log=print,
    **options,
) -> StableDiffusionPipeline:
    """Train the digits pipeline from scratch on the real train-split digits and save it to ``output_dir``.

    Two stages: (a) a tiny ``AutoencoderKL`` (16×16×3 → 8×8×4, reconstruction + small KL) whose
    ``scaling_factor`` is set so scaled latents have unit std; (b) an ε-prediction ``UNet2DConditionModel``
    (~0.8 M parameters) on those latents, conditioned by cross-attention on a frozen, randomly initialised tiny
    CLIP text encoder, with an EMA of its weights saved. A share ``prompt_dropout`` of the training samples get the
    empty prompt instead of theirs, as Stable Diffusion was trained, so the model also learns the unconditional
    distribution that classifier-free guidance extrapolates from. Deterministic given ``seed`` and the torch thread
    count.

    Args:
        output_dir: where ``save_pretrained`` writes the pipeline (nothing is saved when None).
        seed: seeds every initialisation and every random draw of training.
        training: the training recipe (default `DigitsTraining()`).
        log: called with progress lines (pass ``lambda *_: None`` to silence).
        options: fields of `DigitsTraining` to override by name (``vae_steps``, ``unet_steps``, ``batch_size``,
            ``unet_lr``, ``prompt_dropout``), e.g. ``build_digits_pipeline(vae_steps=2, unet_steps=2)``.
    """
    training = dataclasses.replace(training or DigitsTraining(), **options)
    generator = torch.Generator().manual_seed(seed)  # every draw of both stages, in order
    images8, labels = _split("train")
    x = _to_pixels(images8) * 2 - 1  # the VAE works in [-1, 1], like Stable Diffusion's
    vae, latent_mean, latent_std = _train_vae(x, seed, training, generator, log)
    tokenizer, text_encoder, class_embeds, empty_embeds = _frozen_text_encoder(seed)
    data = _DenoiserData(
        latent_mean, latent_std, vae.config.scaling_factor, torch.from_numpy(labels), class_embeds, empty_embeds
    )
    scheduler = _digits_scheduler()
    unet = _train_denoiser(data, scheduler, seed, training, generator, log)
    pipe = assemble_sd_pipeline(unet, vae, text_encoder, tokenizer, scheduler)
    if output_dir is not None:
        pipe.save_pretrained(output_dir)
    return pipe


def load_digits_pipeline(path: str | os.PathLike | None = None) -> StableDiffusionPipeline:
    """Load the digits pipeline (text encoder in eval mode).

    With ``path=None`` it loads the copy shipped in the package (`ASSET_DIR`); if that is missing it builds one
    into ``~/.cache/ddrl_trl/digits-sd`` (about a minute and a half on a CPU, once) and loads that. A given
    ``path`` that holds no pipeline is built the same way.
    """
    if path is None:
        path = ASSET_DIR if (ASSET_DIR / "model_index.json").exists() else CACHE_DIR
    path = Path(path)
    if not (path / "model_index.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Build into a sibling temp dir and rename: a reader never sees a half-written pipeline, and when two
        # processes race the loser's rename fails and it simply uses the winner's copy.
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            build_digits_pipeline(tmp, log=lambda *_: None)
            try:
                os.rename(tmp, path)
            except OSError:
                if not (path / "model_index.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.text_encoder.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------------- evaluate
@dataclass(frozen=True)
class DigitsSampling:
    """How `evaluate_digits_pipeline` samples: stochastic DDIM with ``eta`` (1: as RL post-training samples),
    classifier-free guidance ``guidance_scale`` (1 = none), from a generator seeded with ``seed``."""

    eta: float = 1.0
    seed: int = 0
    guidance_scale: float = 1.0


@torch.no_grad()
def sample_digits(
    pipe: StableDiffusionPipeline, num_inference_steps: int, per_digit: int, sampling: DigitsSampling
) -> tuple[torch.Tensor, list[int], list[str]]:
    """``per_digit`` samples of each digit, digit-major, as ``sampling`` says: the images ``(10·per_digit, 3, H, W)``
    in [0, 1], their digits and their prompts."""
    labels = [d for d in range(10) for _ in range(per_digit)]
    prompts = [digit_prompt(d) for d in labels]
    images = pipe(
        prompts,
        num_inference_steps=num_inference_steps,
        guidance_scale=sampling.guidance_scale,
        eta=sampling.eta,
        generator=torch.Generator().manual_seed(sampling.seed),
        output_type="pt",
    ).images
    return images, labels, prompts


@torch.no_grad()
def evaluate_digits_pipeline(
    pipe: StableDiffusionPipeline,
    evaluator: DigitsEvaluator | None = None,
    num_inference_steps: int = 10,
    per_digit: int = 20,
    rewards: dict | None = None,
    sampling: DigitsSampling | None = None,
    **options,
) -> dict[str, float]:
    """Sample ``per_digit`` images of each digit in ``num_inference_steps`` steps as ``sampling`` says (default
    `DigitsSampling()`: stochastic DDIM, no guidance, seed 0; ``options`` override its fields by name, e.g.
    ``guidance_scale=2.0``) and judge them.

    Returns ``{"accuracy": ..., "ink": ...}``: the evaluator's accuracy against the prompted digits and the mean
    ink reward of the samples; plus, for each ``name: reward(images, prompts)`` of ``rewards``, its mean.
    """
    sampling = dataclasses.replace(sampling or DigitsSampling(), **options)
    evaluator = evaluator or DigitsEvaluator()
    images, labels, prompts = sample_digits(pipe, num_inference_steps, per_digit, sampling)
    result = {"accuracy": evaluator.accuracy(images, labels), "ink": float(np.mean(ink_reward(images, prompts)))}
    for name, reward in (rewards or {}).items():
        result[name] = float(np.mean(reward(images, prompts)))
    return result


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m ddrl_trl.demo.digits [--build DIR] [--evaluate DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", metavar="DIR", help="(re)build the pipeline into DIR, then evaluate it")
    parser.add_argument("--evaluate", metavar="DIR", help="evaluate the pipeline in DIR (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-digit", type=int, default=20, help="samples per digit for the evaluation")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # the build is tuned for (and reproducible on) 2 threads

    if args.build:
        start = time.perf_counter()
        target = Path(args.build)
        if target.exists():
            shutil.rmtree(target)
        build_digits_pipeline(target, seed=args.seed)
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        print(f"built {target} in {time.perf_counter() - start:.1f}s, {size / 2**20:.2f} MiB on disk")
    pipe = load_digits_pipeline(args.build or args.evaluate)
    evaluator = DigitsEvaluator()
    images8, labels = _split("test")
    print(
        f"evaluator accuracy on real test digits: {evaluator.test_accuracy():.3f}, "
        f"mean ink {np.mean(ink_reward(_to_pixels(images8), [])):.4f}"
    )
    for steps, guidance in ((10, 1.0), (20, 1.0), (10, 2.0), (10, 4.0)):
        result = evaluate_digits_pipeline(
            pipe, evaluator, steps, per_digit=args.per_digit, seed=args.seed, guidance_scale=guidance
        )
        print(
            f"samples, DDIM eta=1, {steps} steps, guidance {guidance}: accuracy {result['accuracy']:.3f}, "
            f"mean ink {result['ink']:.4f}"
        )


if __name__ == "__main__":
    main()
