"""Offline tokenizers for the tiny pipelines whose text encoders are language models: Qwen (Qwen2.5-VL, Qwen3),
Mistral-Small and Gemma. Nothing here downloads anything.

Each holds every word it is given as one token (so prompts stay a few tokens long) and spells anything else out by
bytes, never collapsing it to an unknown token; each carries the special tokens and the chat template (text turns
only) that its pipeline's prompt encoding renders. Always pass `model_max_length`.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import GemmaTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

from .components import DEFAULT_WORDS, _learn_merges, byte_level

#: Qwen3's chat template for text turns; with `enable_thinking=False` it adds the empty think block.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

#: Qwen2-VL / Qwen2.5-VL's chat template (the Hub repos' chat_template.json), for text, image and video turns.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Qwen's special tokens (chat turns and vision placeholders), in the real vocabulary's order.
QWEN_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Words of the chat roles and of the system prompts the pipelines put before every prompt (Qwen-Image's, Cosmos'),
#: kept whole so templated prompts keep the real token counts (Qwen-Image drops exactly its first 34 tokens).
TEMPLATE_WORDS = (
    "system",
    "user",
    "assistant",
    "Describe",
    "image",
    "by",
    "detailing",
    "color",
    "shape",
    "size",
    "texture",
    "quantity",
    "text",
    "spatial",
    "relationships",
    "objects",
    "and",
    "background",
    "You",
    "are",
    "helpful",
    "who",
    "will",
    "provide",
    "prompts",
    "to",
    "generator",
)


def _byte_level_bpe(words: Iterable[str], specials: Iterable[str] = ()) -> tuple[dict[str, int], list]:
    """Vocabulary and merges of a byte-level BPE holding each word bare and space-prefixed ("Ġword") as one token:
    `specials` first, then the 256 byte symbols, then merged symbols in order of creation."""
    vocab = {token: i for i, token in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    words = list(dict.fromkeys(words))
    for word in words:
        if not word.isalpha():
            raise ValueError(f"{word!r} is not a single run of letters")
    merges = _learn_merges((byte_level(form) for word in words for form in (word, " " + word)), vocab)
    return vocab, merges


def build_qwen_tokenizer(
    words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 16, chat_template: str = QWEN3_CHAT_TEMPLATE
) -> Qwen2Tokenizer:
    """An offline `Qwen2Tokenizer` (the class Qwen2.5-VL and Qwen3 ship) holding `words` and `TEMPLATE_WORDS` whole,
    `<|endoftext|>` as pad token, Qwen's chat and vision special tokens, `<think>` / `</think>`, and `chat_template`
    (`QWEN3_CHAT_TEMPLATE` or `QWEN2_VL_CHAT_TEMPLATE`). Pads on the right."""
    vocab, merges = _byte_level_bpe([*TEMPLATE_WORDS, *words])
    vocab.setdefault("<|endoftext|>", len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, model_max_length=model_max_length, chat_template=chat_template
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    return tokenizer


#: Mistral-Small-3.x's chat template for a system turn and text user turns (images are not used by prompt encoding).
MISTRAL_CHAT_TEMPLATE = (
    "{%- macro text(content) %}"
    "{%- if content is string %}{{- content }}"
    "{%- else %}{%- for block in content %}{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- else %}{{- '[IMG]' }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- endmacro %}"
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text(message['content']) + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text(message['content']) + '[/INST]' }}"
    "{%- else %}{{- text(message['content']) + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def build_mistral_tokenizer(
    words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 16, whole_texts: Iterable[str] = ()
) -> PreTrainedTokenizerFast:
    """An offline stand-in for Mistral-Small-3.x's processor (its `PixtralProcessor` needs torchvision): a byte-level
    BPE with Mistral's special tokens at their real ids (`<unk>` 0, `<s>` 1, `</s>` 2, `[INST]` 3, `[/INST]` 4,
    `[IMG]` 10, `<pad>` 11, `[SYSTEM_PROMPT]` 17, `[/SYSTEM_PROMPT]` 18), `words` whole, and the chat template.
    Each of `whole_texts` becomes one added token (FLUX.2's long system message, so prompts fit in 16 tokens)."""
    names = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 10: "[IMG]", 11: "<pad>"}
    names.update({12: "[IMG_BREAK]", 13: "[IMG_END]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]"})
    specials = [names.get(i, f"<SPECIAL_{i}>") for i in range(20)]
    vocab, merges = _byte_level_bpe(words, specials)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in whole_texts])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )


def build_gemma_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 16) -> GemmaTokenizer:
    """An offline Gemma tokenizer (BPE with byte fallback; spaces normalised to "▁", `<bos>` prepended): Gemma's
    special tokens at their real ids (`<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, `<mask>` 4), the 256 `<0xNN>` byte
    tokens, printable ASCII, and "▁word" whole for each of `words` (runs of ASCII letters; case is kept)."""
    space = "\u2581"
    vocab: dict[str, int] = {}
    for token in ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)] + [space]:
        vocab.setdefault(token, len(vocab))
    for char in string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
    words = list(dict.fromkeys(words))
    for word in words:
        if not (word.isascii() and word.isalpha()):
            raise ValueError(f"{word!r} is not a run of ASCII letters")
    # Every merge's left part starts with "▁", so merges never cross a word boundary.
    merges = _learn_merges(([space, *word] for word in words), vocab)
    # Gemma's tokenizer_config sets add_bos_token=True; transformers 5 adds <bos> only when the flag is passed.
    return GemmaTokenizer(
        vocab=vocab, merges=merges, model_max_length=model_max_length, add_bos_token=True, add_eos_token=False
    )
