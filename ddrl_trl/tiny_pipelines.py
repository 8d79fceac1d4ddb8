"""Tiny, randomly initialised diffusers pipelines built entirely from config (no Hub downloads).

They exist for tests, benchmarks and examples: every component is small enough that a full sampling call takes
well under a second on a laptop CPU, and every construction is deterministic given a seed. The one piece that
normally needs a download, the CLIP tokenizer, is built in code by :func:`build_word_tokenizer`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

__all__ = [
    "DEFAULT_WORDS",
    "build_word_tokenizer",
    "tiny_clip_text_config",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_EOW = "</w>"  # CLIP's BPE marks the last symbol of every word with this suffix.

#: Words that get whole-word tokens in the tiny pipelines' tokenizers (any other word is spelled out by bytes).
DEFAULT_WORDS = [
    "a", "an", "the", "of", "photo", "picture", "painting", "drawing", "handwritten", "digit",
    "cat", "dog", "bird", "horse", "fish", "tree", "flower", "house", "car", "boat",
    "red", "green", "blue", "yellow", "black", "white", "small", "big", "bright", "dark",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
]  # fmt: skip


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Run byte-pair merging on one word exactly as the BPE model does: always merge the best-ranked pair."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        _, i = min(pairs)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_word_tokenizer(words: Iterable[str], model_max_length: int = 16) -> CLIPTokenizer:
    """An offline CLIP BPE tokenizer whose vocabulary holds every word of ``words`` as one whole token.

    The vocabulary also holds the 256 byte-level symbols (with and without the end-of-word suffix), so any other
    word is still encoded, symbol by symbol, instead of collapsing to the unknown token. Ids are deterministic:
    the two special tokens first, then the byte alphabet, then merged symbols in order of creation.

    Args:
        words: words to keep whole. They go through CLIP's normalisation (lower-cased) and pre-tokenisation, so a
            word must be a single run of letters (e.g. ``"seven"``, not ``"seven-ish"``).
        model_max_length: sequence length the pipelines pad and truncate prompts to. Always set it: the
            transformers default (~1e30) makes SD pipelines try to pad to it.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for symbol in alphabet + [c + _EOW for c in alphabet]:
        vocab.setdefault(symbol, len(vocab))

    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):  # dedupe, keep order
        if not word.isalpha():
            raise ValueError(f"build_word_tokenizer: {word!r} is not a single run of letters")
        # Byte-level encoding of the word (identity for ASCII letters), last symbol carries the suffix.
        chars = _byte_level(word)
        chars[-1] += _EOW
        # Merge the two leading pieces of the word's current segmentation until it is one token. New merges rank
        # after every earlier one, so they never fire before an earlier merge could: words added before keep
        # their single token. Re-segmenting after each merge keeps this exact even for repetitive words.
        pieces = _apply_merges(chars, ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _apply_merges(chars, ranks)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _byte_level(word: str) -> list[str]:
    """The byte-level (GPT-2 style) symbols of a word's UTF-8 bytes, as CLIP's pre-tokenizer produces them."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    ((mapped, _),) = pre.pre_tokenize_str(word)
    return list(mapped)


def tiny_clip_text_config(vocab_size: int, hidden_size: int = 32, max_position_embeddings: int = 16, **kwargs):
    """A 2-layer CLIP text encoder config; ``vocab_size`` must cover the tokenizer (``len(tokenizer)``)."""
    defaults = dict(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        layer_norm_eps=1e-5,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        hidden_act="gelu",
        projection_dim=hidden_size,
    )
    defaults.update(kwargs)
    return CLIPTextConfig(**defaults)


def _tiny_vae(latent_channels: int = 4) -> AutoencoderKL:
    # Three blocks -> two downsamplings -> VAE scale factor 4: 8x8 latents decode to 32x32 images.
    return AutoencoderKL(
        block_out_channels=(8, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )


def tiny_sd_pipeline(
    seed: int = 0,
    prediction_type: str = "epsilon",
    sample_size: int = 8,
    words: Iterable[str] | None = None,
) -> StableDiffusionPipeline:
    """A randomly initialised Stable Diffusion pipeline small enough for CPU unit tests.

    UNet (32, 64) with one layer per block and cross-attention dim 32, a 3-block VAE (scale factor 4, so the
    default 8x8 latents are 32x32 images), a 2-layer CLIP text encoder (hidden 32, in eval mode) with a word
    tokenizer and a ``DDIMScheduler``. Two calls with the same arguments give identical weights.

    Args:
        seed: seeds the weight initialisation of every component.
        prediction_type: the scheduler's parameterisation, ``"epsilon"`` or ``"v_prediction"``.
        sample_size: latent side length; images are ``4 * sample_size`` pixels wide.
        words: whole-word tokens for the tokenizer (default :data:`DEFAULT_WORDS`).
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    tokenizer = build_word_tokenizer(DEFAULT_WORDS if words is None else words, model_max_length=16)
    torch.manual_seed(seed)
    unet = tiny_unet(sample_size)
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_clip_text_config(len(tokenizer))).eval()
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return assemble_sd_pipeline(unet, vae, text_encoder, tokenizer, scheduler)


def tiny_unet(sample_size: int, norm_num_groups: int = 32) -> UNet2DConditionModel:
    """A two-level (32, 64) text-conditional UNet on 4-channel latents, cross-attention dim 32 (~0.8 M params).

    Shared by the tiny test pipelines and the digits demo's base model; seed torch before calling it.
    """
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=norm_num_groups,
    )


def assemble_sd_pipeline(unet, vae, text_encoder, tokenizer, scheduler) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` from its parts, with no safety checker and no progress bar (for tests and demos)."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 8) -> StableDiffusionXLPipeline:
    """A randomly initialised Stable Diffusion XL pipeline small enough for CPU unit tests.

    Two CLIP text encoders (hidden 32 each; the second with a 32-dim projection whose pooled output feeds the
    UNet's ``text_time`` added conditioning), a UNet (32, 64) with cross-attention dim 64 (the two encoders'
    hidden states concatenated), the same tiny VAE as :func:`tiny_sd_pipeline` and a ``DDIMScheduler``.
    """
    tokenizer = build_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    tokenizer_2 = build_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    hidden, projection_dim, time_embed_dim = 32, 32, 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # SDXL adds 6 micro-conditioning numbers (original size, crop, target size), each Fourier-embedded,
        # to the pooled embedding of the second text encoder.
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
        cross_attention_dim=2 * hidden,
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_clip_text_config(len(tokenizer), hidden)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        tiny_clip_text_config(len(tokenizer_2), hidden, projection_dim=projection_dim)
    ).eval()
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0, sample_size: int = 8) -> StableDiffusion3Pipeline:
    """A randomly initialised Stable Diffusion 3 pipeline small enough for CPU unit tests.

    Mirrors diffusers' own SD3 test components: a 1-layer ``SD3Transformer2DModel`` (patch 1, 4 heads of 8),
    two CLIP text encoders with projection (hidden 32, projection 32; their pooled outputs concatenate to the
    transformer's 64-dim pooled projection) with word tokenizers, a 1-layer T5 encoder (d_model 32) with an offline
    unigram tokenizer holding every word of :data:`DEFAULT_WORDS` (other words are spelled out by characters), the
    tiny VAE of :func:`tiny_sd_pipeline` with SD3's latent shift and scale, and a flow-matching Euler scheduler.
    Images are ``4 * sample_size`` pixels wide (32x32 by default). All tokenizers have ``model_max_length=16``;
    pass ``max_sequence_length=16`` to the pipeline so T5 does not pad prompts to 256 tokens.
    """
    tokenizer = build_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    tokenizer_2 = build_word_tokenizer(DEFAULT_WORDS, model_max_length=16)
    pieces = ["\u2581"] + ["\u2581" + w for w in dict.fromkeys(DEFAULT_WORDS)]
    pieces += list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    # Whole words score highest, so the unigram model prefers them to spelling a word out by characters.
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab = specials + [(p, -1.0 if len(p) > 1 else -10.0) for p in pieces]
    tokenizer_3 = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=16)
    hidden = 32
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=hidden,
        joint_attention_dim=hidden,  # T5's d_model; the 64-dim concatenated CLIP states are cut to it
        pooled_projection_dim=2 * hidden,
        out_channels=4,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5035)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(tiny_clip_text_config(len(tokenizer), hidden)).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(len(tokenizer_2), hidden)).eval()
    torch.manual_seed(seed + 4)
    t5_config = T5Config(
        vocab_size=len(tokenizer_3), d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    text_encoder_3 = T5EncoderModel(t5_config).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
