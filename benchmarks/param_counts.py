"""Parameter counts and bf16 weight sizes of the real components of the 2025–26 model families.

Every component is instantiated from its published configuration on the `meta` device: shapes only, no weights, no
download, a few seconds on a CPU. The configuration values are typed from the sources named in the comment above each
one (the models' config.json files and diffusers' conversion scripts); values that do not change the number of
parameters (RoPE settings, maximum lengths, norm epsilons) are left at the classes' defaults.

    python benchmarks/param_counts.py

prints two markdown tables: every component of every family (with the part of a text encoder that prompt embeddings
do not need: a vision tower, an untied LM head), and per family the bf16 weights that LoRA training keeps resident,
with and without the text encoder, against the float32 weights, gradients and AdamW moments (16 bytes per parameter)
that full fine-tuning needs for the denoiser. docs/adapters.md ("Memory notes per family") quotes them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    CosmosTransformer3DModel,
    Flux2Transformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    ZImageTransformer2DModel,
)
from transformers import (
    Gemma2Config,
    Gemma2Model,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

GiB = 2**30
#: Parameters that prompt embeddings do not need: a VLM's vision tower and projector, an untied LM head (a tied one
#: shares the embeddings' weight and is counted once, with them).
UNUSED_PREFIXES = ("model.visual", "model.vision_tower", "model.multi_modal_projector", "lm_head")


def hf(model_class: type, config_class: type) -> Callable[..., torch.nn.Module]:
    """A transformers model built from keyword arguments of its config class."""

    def build(**config) -> torch.nn.Module:
        return model_class(config_class(**config))

    build.__name__ = model_class.__name__
    return build


QWEN25_VL = hf(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig)
MISTRAL3 = hf(Mistral3ForConditionalGeneration, Mistral3Config)
QWEN3_LM = hf(Qwen3ForCausalLM, Qwen3Config)
QWEN3 = hf(Qwen3Model, Qwen3Config)
GEMMA2 = hf(Gemma2Model, Gemma2Config)


# --- Text encoders ---------------------------------------------------------------------------------------------------
# Qwen/Qwen2.5-VL-7B-Instruct config.json (Qwen-Image's text_encoder; Cosmos-Reason1-7B, Cosmos-Predict2.5's, has the
# same architecture: cosmos-rl cosmos-predict2-5 DDRL toml [model.text_encoder_config.encoder_model_config]).
QWEN25_VL_7B = dict(
    text_config=dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    vision_config=dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_chans=3,
    ),
    tie_word_embeddings=False,
)
# mistralai/Mistral-Small-3.2-24B-Instruct-2506 config.json (FLUX.2 [dev], per scripts/convert_flux2_to_diffusers.py);
# Pixtral vision tower as Mistral-Small-3.1-24B's. Untied LM head (transformers' Mistral3Config defaults to tied).
MISTRAL_SMALL_24B = dict(
    text_config=dict(
        model_type="mistral",
        hidden_size=5120,
        intermediate_size=32768,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=131072,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
    vision_config=dict(
        model_type="pixtral",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        head_dim=64,
        image_size=1540,
        patch_size=14,
        num_channels=3,
    ),
    spatial_merge_size=2,
    multimodal_projector_bias=False,
    tie_word_embeddings=False,
)
# Qwen/Qwen3-4B and Qwen/Qwen3-8B config.json (FLUX.2 [klein] 4B / 9B; Z-Image uses Qwen3-4B).
QWEN3_COMMON = dict(
    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936
)
QWEN3_4B = dict(QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True)
QWEN3_8B = dict(QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)
# google/gemma-2-2b-it config.json (SANA; SanaPipeline uses the decoder without LM head).
GEMMA2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
)

# --- VAEs ------------------------------------------------------------------------------------------------------------
# Qwen/Qwen-Image vae/config.json (= AutoencoderKLQwenImage's defaults).
QWENIMAGE_VAE = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
)
# scripts/convert_flux2_to_diffusers.py builds AutoencoderKLFlux2() with its defaults.
FLUX2_VAE: dict = {}
# The FLUX.1 VAE, as in Tongyi-MAI/Z-Image-Turbo vae/config.json.
FLUX1_VAE = dict(
    latent_channels=16,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# scripts/convert_dcae_to_diffusers.py get_ae_config("dc-ae-f32c32-sana-1.0").
DC_AE_F32C32 = dict(
    latent_channels=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
    decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    downsample_block_type="conv",
    upsample_block_type="interpolate",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
)
# scripts/convert_cosmos_to_diffusers.py loads Wan-AI/Wan2.1-T2V-1.3B-Diffusers/vae: AutoencoderKLWan's defaults.
WAN21_VAE: dict = {}

# --- Denoisers -------------------------------------------------------------------------------------------------------
# Qwen/Qwen-Image transformer/config.json.
QWENIMAGE_DIT = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
# scripts/convert_flux2_to_diffusers.py get_flux2_transformer_config (flux2-dev, klein-4b, klein-9b).
FLUX2 = dict(in_channels=128, attention_head_dim=128)
FLUX2_DEV_DIT = dict(FLUX2, num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360)
FLUX2_KLEIN_4B_DIT = dict(
    FLUX2, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False
)
FLUX2_KLEIN_9B_DIT = dict(
    FLUX2, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288, guidance_embeds=False
)
# Tongyi-MAI/Z-Image-Turbo transformer/config.json (Tongyi-MAI/Z-Image: the same architecture).
ZIMAGE_DIT = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    qk_norm=True,
    cap_feat_dim=2560,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)
# scripts/convert_sana_to_diffusers.py model_kwargs (SANA 1.5: qk_norm "rms_norm_across_heads").
SANA = dict(in_channels=32, out_channels=32, attention_head_dim=32, caption_channels=2304, mlp_ratio=2.5, patch_size=1)
SANA_1600M = dict(
    SANA, num_attention_heads=70, num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240
)
SANA_600M_DIT = dict(
    SANA,
    num_layers=28,
    num_attention_heads=36,
    num_cross_attention_heads=16,
    cross_attention_head_dim=72,
    cross_attention_dim=1152,
)
SANA_1600M_DIT = dict(SANA_1600M, num_layers=20)
SANA15_4800M_DIT = dict(SANA_1600M, num_layers=60, qk_norm="rms_norm_across_heads")
# scripts/convert_cosmos_to_diffusers.py TRANSFORMER_CONFIGS["Cosmos-2.5-Predict-Base-2B" / "-14B"].
COSMOS25 = dict(
    in_channels=16 + 1,
    out_channels=16,
    attention_head_dim=128,
    mlp_ratio=4.0,
    text_embed_dim=1024,
    adaln_lora_dim=256,
    max_size=(128, 240, 240),
    patch_size=(1, 2, 2),
    rope_scale=(1.0, 3.0, 3.0),
    concat_padding_mask=True,
    extra_pos_embed_type=None,
    use_crossattn_projection=True,
    crossattn_proj_in_channels=100352,
    encoder_hidden_states_channels=1024,
)
COSMOS25_2B_DIT = dict(COSMOS25, num_attention_heads=16, num_layers=28)
COSMOS25_14B_DIT = dict(COSMOS25, num_attention_heads=40, num_layers=36)

# --- The table: (family, component, constructor, config) ------------------------------------------------------------
# A component is "denoiser", "text encoder" or "VAE", optionally followed by ": <which model>".
ROWS: list[tuple[str, str, Callable[..., torch.nn.Module], dict]] = [
    ("Qwen-Image", "denoiser", QwenImageTransformer2DModel, QWENIMAGE_DIT),
    ("Qwen-Image", "text encoder: Qwen2.5-VL-7B", QWEN25_VL, QWEN25_VL_7B),
    ("Qwen-Image", "VAE", AutoencoderKLQwenImage, QWENIMAGE_VAE),
    ("FLUX.2 [dev]", "denoiser", Flux2Transformer2DModel, FLUX2_DEV_DIT),
    ("FLUX.2 [dev]", "text encoder: Mistral-Small-3.2-24B", MISTRAL3, MISTRAL_SMALL_24B),
    ("FLUX.2 [dev]", "VAE", AutoencoderKLFlux2, FLUX2_VAE),
    ("FLUX.2 [klein] 4B", "denoiser", Flux2Transformer2DModel, FLUX2_KLEIN_4B_DIT),
    ("FLUX.2 [klein] 4B", "text encoder: Qwen3-4B", QWEN3_LM, QWEN3_4B),
    ("FLUX.2 [klein] 4B", "VAE", AutoencoderKLFlux2, FLUX2_VAE),
    ("FLUX.2 [klein] 9B", "denoiser", Flux2Transformer2DModel, FLUX2_KLEIN_9B_DIT),
    ("FLUX.2 [klein] 9B", "text encoder: Qwen3-8B", QWEN3_LM, QWEN3_8B),
    ("FLUX.2 [klein] 9B", "VAE", AutoencoderKLFlux2, FLUX2_VAE),
    ("Z-Image", "denoiser", ZImageTransformer2DModel, ZIMAGE_DIT),
    ("Z-Image", "text encoder: Qwen3-4B", QWEN3, QWEN3_4B),
    ("Z-Image", "VAE: FLUX.1's", AutoencoderKL, FLUX1_VAE),
    ("SANA 600M", "denoiser", SanaTransformer2DModel, SANA_600M_DIT),
    ("SANA 600M", "text encoder: Gemma-2-2B", GEMMA2, GEMMA2_2B),
    ("SANA 600M", "VAE: DC-AE f32c32", AutoencoderDC, DC_AE_F32C32),
    ("SANA 1600M", "denoiser", SanaTransformer2DModel, SANA_1600M_DIT),
    ("SANA 1600M", "text encoder: Gemma-2-2B", GEMMA2, GEMMA2_2B),
    ("SANA 1600M", "VAE: DC-AE f32c32", AutoencoderDC, DC_AE_F32C32),
    ("SANA 1.5 4.8B", "denoiser", SanaTransformer2DModel, SANA15_4800M_DIT),
    ("SANA 1.5 4.8B", "text encoder: Gemma-2-2B", GEMMA2, GEMMA2_2B),
    ("SANA 1.5 4.8B", "VAE: DC-AE f32c32", AutoencoderDC, DC_AE_F32C32),
    ("Cosmos-Predict2.5 2B", "denoiser", CosmosTransformer3DModel, COSMOS25_2B_DIT),
    ("Cosmos-Predict2.5 2B", "text encoder: Cosmos-Reason1-7B", QWEN25_VL, QWEN25_VL_7B),
    ("Cosmos-Predict2.5 2B", "VAE: Wan 2.1's", AutoencoderKLWan, WAN21_VAE),
    ("Cosmos-Predict2.5 14B", "denoiser", CosmosTransformer3DModel, COSMOS25_14B_DIT),
    ("Cosmos-Predict2.5 14B", "text encoder: Cosmos-Reason1-7B", QWEN25_VL, QWEN25_VL_7B),
    ("Cosmos-Predict2.5 14B", "VAE: Wan 2.1's", AutoencoderKLWan, WAN21_VAE),
]


def count(build: Callable[..., torch.nn.Module], config: dict) -> tuple[int, int]:
    """(all parameters, the unused ones) of the module `build(**config)`, instantiated on the meta device."""
    with torch.device("meta"):
        module = build(**config)
    numels = {name: p.numel() for name, p in module.named_parameters()}  # a tied weight once
    unused = sum(n for name, n in numels.items() if name.startswith(UNUSED_PREFIXES))
    return sum(numels.values()), unused


def billions(n: int) -> str:
    return f"{n / 1e9:.3f}"


def gib(n: int, bytes_per_param: int = 2) -> str:
    return f"{n * bytes_per_param / GiB:.1f}"


def main() -> None:
    counts: dict[tuple[str, int], tuple[int, int]] = {}  # a component shared by families is built once
    totals: dict[str, dict[str, int]] = {}
    lines = [
        "| family | component | class | params (B) | bf16 (GiB) | of which unused (B) |",
        "|---|---|---|---|---|---|",
    ]
    for family, component, build, config in ROWS:
        key = (build.__name__, id(config))
        if key not in counts:
            counts[key] = count(build, config)
        n, unused = counts[key]
        role = component.partition(":")[0]
        totals.setdefault(family, {"denoiser": 0, "text encoder": 0, "VAE": 0})[role] += n
        unused_text = billions(unused) if unused else ""
        lines.append(f"| {family} | {component} | {build.__name__} | {billions(n)} | {gib(n)} | {unused_text} |")
    lines += [
        "",
        "| family | all components (B) | all in bf16 (GiB) | bf16 without the text encoder (GiB) "
        "| full fine-tune: denoiser's fp32 weights, grads, AdamW moments (GiB) |",
        "|---|---|---|---|---|",
    ]
    for family, parts in totals.items():
        total = sum(parts.values())
        lines.append(
            f"| {family} | {billions(total)} | {gib(total)} | {gib(total - parts['text encoder'])} "
            f"| {gib(parts['denoiser'], 16)} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
