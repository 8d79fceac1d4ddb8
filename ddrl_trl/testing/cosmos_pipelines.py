"""A tiny, randomly initialised Cosmos-Predict2.5 pipeline (`Cosmos2_5_PredictBasePipeline`), fully offline.

The component layout is the real one (diffusers' `scripts/convert_cosmos_to_diffusers.py`,
"Cosmos-2.5-Predict-Base-2B", and `tests/pipelines/cosmos/test_cosmos2_5_predict.py`), shrunk:
- `CosmosTransformer3DModel` with 16 + 1 input channels (latents + the condition-mask channel), the padding-mask
  channel (`concat_padding_mask=True`), no learnable positional embedding, and the cross-attention projection of the
  concatenated text-encoder layers (`use_crossattn_projection`; real: 28 layers x 3584 = 100352 -> 1024);
- a 2-layer `Qwen2_5_VLForConditionalGeneration` (hidden 16, so the prompt embedding is 2 x 16 = 32 wide) with the
  offline chat-template tokenizer of `llm_tokenizers`;
- the tiny causal `AutoencoderKLWan` of diffusers' Wan/Cosmos tests (4x temporal, 8x spatial; Wan 2.1's per-channel
  latent mean/std), as Cosmos-Predict2.5 uses the Wan 2.1 VAE;
- the shipped scheduler: `UniPCMultistepScheduler(use_karras_sigmas=True, use_flow_sigmas=True,
  prediction_type="flow_prediction", sigma_max=200, sigma_min=0.01)`;
- a stand-in safety checker (the real `cosmos_guardrail` one is large, downloads its models, and `__call__` refuses
  to run without a checker).

Two offline work-arounds, both only when the real package is missing:
- `CosmosTransformer3DModel(concat_padding_mask=True)` resizes the padding mask with `torchvision`
  (transformer_cosmos.py:31-32, 735-737), which has no CPU wheel here: a nearest-neighbour stand-in is installed into
  that module (the mask is all zeros in text-to-world, so any resize gives the same zeros).
- The safety checker: `DummyCosmosSafetyChecker` below (text always safe, video returned unchanged), the same
  contract as diffusers' own test double (tests/pipelines/cosmos/cosmos_guardrail.py).

The tokenizer's `model_max_length` is 48 (the pipeline's system prompt alone is ~22 tokens): pass
`max_sequence_length=48` to the pipeline (its default is 512). Videos of 4k + 1 frames at multiples of 16 px (the
pipeline's check) work; `num_frames=1` is text-to-image.
"""

from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import Cosmos2_5_PredictBasePipeline, CosmosTransformer3DModel, UniPCMultistepScheduler
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import is_torchvision_available

from .components import tiny_pipeline
from .dit_pipelines import tiny_qwen2_5_vl
from .flow_pipelines import tiny_wan_vae
from .llm_tokenizers import QWEN2_VL_CHAT_TEMPLATE, build_qwen_tokenizer

#: The tiny tokenizer's length; pass it as the pipeline's `max_sequence_length`.
TINY_MAX_SEQUENCE_LENGTH = 48


class DummyCosmosSafetyChecker(ModelMixin, ConfigMixin):
    """Stand-in for `cosmos_guardrail.CosmosSafetyChecker`: every prompt is safe, every video passes unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_device_tracker", torch.zeros(1), persistent=False)

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray:
        return frames


def _nearest_resize(tensor: torch.Tensor, size, interpolation=None, **_) -> torch.Tensor:
    """torchvision.transforms.functional.resize for the one use CosmosTransformer3DModel makes of it: nearest
    resizing of a (N, C, H, W) padding mask."""
    return F.interpolate(tensor, size=list(size), mode="nearest")


def install_torchvision_resize_stand_in() -> None:
    """Give `transformer_cosmos` the `transforms` it imports from torchvision, when torchvision is not installed."""
    from diffusers.models.transformers import transformer_cosmos

    if is_torchvision_available() or hasattr(transformer_cosmos, "transforms"):
        return
    transformer_cosmos.transforms = types.SimpleNamespace(
        functional=types.SimpleNamespace(resize=_nearest_resize),
        InterpolationMode=types.SimpleNamespace(NEAREST="nearest"),
    )


def tiny_cosmos_pipeline(seed: int = 0) -> Cosmos2_5_PredictBasePipeline:
    """A randomly initialised Cosmos-Predict2.5 text/image/video-to-world pipeline small enough for CPU tests.

    A 2-layer `CosmosTransformer3DModel` (2 heads of 16, patch (1, 2, 2), RoPE scale (1, 3, 3) as the 2B model),
    the tiny Wan VAE, a 2-layer Qwen2.5-VL text encoder (prompt embedding 2 x 16 = 32 wide, projected to 16 in the
    transformer) and the shipped Karras-flow UniPC scheduler. 9 frames at 32x32 px (latents 3x4x4) sample in a fraction
    of a second; `max_size` allows up to 4 latent frames (13 video frames) and 256 px.
    """
    install_torchvision_resize_stand_in()
    tokenizer = build_qwen_tokenizer(model_max_length=TINY_MAX_SEQUENCE_LENGTH, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    text_layers, text_hidden = 2, 16
    builders = {
        "transformer": lambda: CosmosTransformer3DModel(
            in_channels=16 + 1,
            out_channels=16,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            mlp_ratio=2,
            text_embed_dim=16,
            adaln_lora_dim=4,
            max_size=(4, 32, 32),
            patch_size=(1, 2, 2),
            rope_scale=(1.0, 3.0, 3.0),
            concat_padding_mask=True,
            extra_pos_embed_type=None,
            use_crossattn_projection=True,
            crossattn_proj_in_channels=text_layers * text_hidden,  # all hidden layers concatenated (real: 28 x 3584)
            encoder_hidden_states_channels=16,
        ),
        "vae": tiny_wan_vae,
        "text_encoder": lambda: tiny_qwen2_5_vl(len(tokenizer), tokenizer, hidden=text_hidden, layers=text_layers),
    }
    scheduler = UniPCMultistepScheduler(
        use_karras_sigmas=True,
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        sigma_max=200.0,
        sigma_min=0.01,
    )
    return tiny_pipeline(
        Cosmos2_5_PredictBasePipeline,
        seed,
        builders,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=DummyCosmosSafetyChecker(),
    )
