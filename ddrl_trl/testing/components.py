"""Offline building blocks of the tiny pipelines: word tokenizers (CLIP BPE and T5 unigram), text encoders and
their configs, a 3-block VAE, and `tiny_pipeline`, which seeds, builds and assembles the components of every tiny
pipeline. Nothing here downloads anything."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_EOW = "</w>"  # CLIP's BPE marks the last symbol of every word with this suffix.

#: Words that get whole-word tokens in the tiny pipelines' tokenizers (any other word is spelled out by bytes).
DEFAULT_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "photo",
    "picture",
    "painting",
    "drawing",
    "handwritten",
    "digit",
    "cat",
    "dog",
    "bird",
    "horse",
    "fish",
    "tree",
    "flower",
    "house",
    "car",
    "boat",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "small",
    "big",
    "bright",
    "dark",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
]


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


def _learn_merges(pieces: Iterable[list[str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges that make each symbol sequence of `pieces` one token, added to `vocab`.

    For each piece, merge the two leading parts of its current segmentation until it is one token. A new merge ranks
    after every earlier one, so it never fires before an earlier merge could: pieces added before keep their single
    token. Re-segmenting after each merge keeps this exact even for repetitive pieces."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for symbols in pieces:
        parts = _apply_merges(symbols, ranks)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(merges)
            merges.append((parts[0], parts[1]))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = _apply_merges(symbols, ranks)
    return merges


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
    words = dict.fromkeys(w.lower() for w in words)  # dedupe, keep order
    merges = _learn_merges((_clip_word_symbols(word) for word in words), vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _clip_word_symbols(word: str) -> list[str]:
    """A word's byte-level symbols (identity for ASCII letters), the last one carrying CLIP's end-of-word suffix."""
    if not word.isalpha():
        raise ValueError(f"build_word_tokenizer: {word!r} is not a single run of letters")
    chars = byte_level(word)
    chars[-1] += _EOW
    return chars


def byte_level(text: str) -> list[str]:
    """The byte-level (GPT-2 style) symbols of a text's UTF-8 bytes ("Ġ" for a space, "Ċ" for a newline), as CLIP's
    and Qwen's pre-tokenizers produce them."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    ((mapped, _),) = pre.pre_tokenize_str(text)
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


#: The block layout of every tiny image VAE: three blocks, so two downsamplings (scale factor 4: 8x8 latents decode to
#: 32x32 images).
TINY_VAE_BLOCKS: dict[str, Any] = dict(
    block_out_channels=(8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
)


def tiny_vae(latent_channels: int = 4) -> AutoencoderKL:
    """A 3-block RGB ``AutoencoderKL`` (scale factor 4; `TINY_VAE_BLOCKS`) with ``latent_channels`` latent channels."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, **TINY_VAE_BLOCKS)


def build_t5_word_tokenizer(words: Iterable[str] = (), model_max_length: int = 16) -> T5Tokenizer:
    """An offline T5 (unigram) tokenizer holding every word of `words` as one piece; other words are spelled out by
    characters. Whole words score highest, so the unigram model prefers them to spelling a word out."""
    pieces = ["\u2581"] + ["\u2581" + w for w in dict.fromkeys(words)]
    pieces += list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab = specials + [(p, -1.0 if len(p) > 1 else -10.0) for p in pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_config(vocab_size: int, d_model: int = 32) -> T5Config:
    """A 1-layer T5 encoder config (4 heads of 8) for `T5EncoderModel` or `UMT5EncoderModel`."""
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


@dataclass(frozen=True)
class DecoderSize:
    """The sizes of a narrow decoder-only language model (the text encoders of the DiT pipelines): the fields that
    every Hugging Face decoder config shares, with an MLP ``2 * hidden`` wide."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    max_positions: int
    head_dim: int | None = None  # None: not set, the config's default (hidden / heads)

    def config_fields(self, vocab_size: int) -> dict[str, Any]:
        """The config keyword arguments (``hidden_size``, ``num_hidden_layers``, ...) for ``vocab_size`` tokens."""
        fields = {
            "vocab_size": vocab_size,
            "hidden_size": self.hidden,
            "intermediate_size": 2 * self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": self.max_positions,
        }
        if self.head_dim is not None:
            fields["head_dim"] = self.head_dim
        return fields


def clip_text_encoder(tokenizer, hidden_size: int = 32, model_class: type = CLIPTextModel, **config):
    """A `tiny_clip_text_config` text encoder of class ``model_class`` (``CLIPTextModel`` or
    ``CLIPTextModelWithProjection``) covering ``tokenizer``'s vocabulary, in eval mode; seed torch before calling
    it."""
    return model_class(tiny_clip_text_config(len(tokenizer), hidden_size, **config)).eval()


def t5_text_encoder(tokenizer, d_model: int = 32, model_class: type = T5EncoderModel):
    """A `tiny_t5_config` encoder of class ``model_class`` (``T5EncoderModel`` or ``UMT5EncoderModel``) covering
    ``tokenizer``'s vocabulary, in eval mode; seed torch before calling it."""
    return model_class(tiny_t5_config(len(tokenizer), d_model)).eval()


def seeded_parts(
    seed: int, builders: Mapping[str, Callable[[], Any]], offsets: Sequence[int] | None = None
) -> dict[str, Any]:
    """Call each of ``builders`` in order, each right after ``torch.manual_seed(seed + offset)``: the offset is the
    builder's position unless ``offsets`` gives one per builder. Returns ``{name: built component}``.

    Seeding every component on its own keeps its weights independent of the other components' sizes; the fixed
    order keeps the global RNG state a build leaves behind reproducible too."""
    offsets = range(len(builders)) if offsets is None else offsets
    if len(offsets) != len(builders):
        raise ValueError(f"seeded_parts: {len(builders)} builders but {len(offsets)} offsets")
    parts = {}
    for (name, build), offset in zip(builders.items(), offsets):
        torch.manual_seed(seed + offset)
        parts[name] = build()
    return parts


def quiet_pipeline(pipeline_class: type, **parts):
    """``pipeline_class(**parts)`` with its progress bar turned off, as tests and demos want it."""
    pipe = pipeline_class(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(
    pipeline_class: type,
    seed: int,
    builders: Mapping[str, Callable[[], Any]],
    offsets: Sequence[int] | None = None,
    **parts,
):
    """A `quiet_pipeline` of ``pipeline_class`` from the randomly initialised components of ``builders`` (built by
    `seeded_parts` from ``seed`` and ``offsets``) and the ready ``parts`` (tokenizers, scheduler, flags)."""
    return quiet_pipeline(pipeline_class, **parts, **seeded_parts(seed, builders, offsets))
