"""Test utilities: tiny, randomly initialised diffusers pipelines built entirely from config (no Hub downloads).

Not part of training: use them in your own tests of rewards, adapters or configs (`tiny_sd_pipeline()`,
`tiny_sd3_pipeline()`, `tiny_flux_pipeline()`, `tiny_wan_pipeline()`, `tiny_qwenimage_pipeline()`, ...), as
ddrl-trl's tests and benchmarks do. Every component is small enough that a full sampling call takes well under a
second on a laptop CPU, and every construction is deterministic given a seed. The pieces that normally need a
download, the tokenizers, are built in code (`components`, `llm_tokenizers`); the embedded digits demo builds its base
model from the same pieces.
"""

from .components import (
    DEFAULT_WORDS,
    build_t5_word_tokenizer,
    build_word_tokenizer,
    tiny_clip_text_config,
    tiny_t5_config,
    tiny_vae,
)
from .cosmos_pipelines import tiny_cosmos_pipeline
from .dit_pipelines import tiny_qwenimage_pipeline, tiny_sana_pipeline, tiny_zimage_pipeline
from .flow_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_wan_pipeline
from .flux2_pipelines import tiny_flux2_klein_pipeline, tiny_flux2_pipeline
from .unet_pipelines import assemble_sd_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_unet

__all__ = [
    "DEFAULT_WORDS",
    "assemble_sd_pipeline",
    "build_t5_word_tokenizer",
    "build_word_tokenizer",
    "tiny_clip_text_config",
    "tiny_cosmos_pipeline",
    "tiny_flux2_klein_pipeline",
    "tiny_flux2_pipeline",
    "tiny_flux_pipeline",
    "tiny_qwenimage_pipeline",
    "tiny_sana_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_t5_config",
    "tiny_unet",
    "tiny_vae",
    "tiny_wan_pipeline",
    "tiny_zimage_pipeline",
]
