"""Offline building blocks of the tiny pipelines: word tokenizers (CLIP BPE and T5 unigram), text-encoder configs
and a 3-block VAE. Nothing here downloads anything."""

from __future__ import annotations

from collections.abc import Iterable

from diffusers import AutoencoderKL
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5Tokenizer

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


def tiny_vae(latent_channels: int = 4) -> AutoencoderKL:
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
