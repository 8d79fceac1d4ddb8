"""Tiny, randomly initialised diffusers pipelines built entirely from config (no Hub downloads).

They exist for tests, benchmarks and examples: every component is small enough that a full sampling call takes
well under a second on a laptop CPU, and every construction is deterministic given a seed. The pieces that normally
need a download, the tokenizers, are built in code (`components`).
"""

from .components import (
    DEFAULT_WORDS,
    build_t5_word_tokenizer,
    build_word_tokenizer,
    tiny_clip_text_config,
    tiny_t5_config,
    tiny_vae,
)
from .flow_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_wan_pipeline
from .unet_pipelines import assemble_sd_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_unet

__all__ = [
    "DEFAULT_WORDS",
    "assemble_sd_pipeline",
    "build_t5_word_tokenizer",
    "build_word_tokenizer",
    "tiny_clip_text_config",
    "tiny_flux_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_t5_config",
    "tiny_unet",
    "tiny_vae",
    "tiny_wan_pipeline",
]
