"""Reference data: the columns (prompts and paired reference samples) and their checks (`columns.py`), reading
images and videos (`media.py`), the one-off VAE encoding (`encoding.py`), drawing and collating rows
(`sampling.py`), and synthetic references made by the base pipeline (`synthetic.py`)."""

from .columns import (
    DEFAULT_PROMPT_COLUMN,
    DIFFUSERS_PROMPT_COLUMNS,
    REF_LATENTS_COLUMN,
    arrow_column,
    check_columns,
    check_evaluation_dataset,
    check_negative_prompts,
    check_prompts,
    prompt_column_of,
    reference_column_of,
    with_prompt_column,
)
from .encoding import (
    encode_reference_dataset,
)
from .media import (
    array_to_image,
    load_image,
    load_video_frames,
    resize_center_crop,
    to_rgb,
    upscale_factor,
    video_to_tensor,
)
from .sampling import (
    DDRLCollator,
    RepeatSampler,
)
from .synthetic import (
    build_synthetic_reference_dataset,
)

__all__ = [
    "DDRLCollator",
    "DEFAULT_PROMPT_COLUMN",
    "DIFFUSERS_PROMPT_COLUMNS",
    "REF_LATENTS_COLUMN",
    "RepeatSampler",
    "array_to_image",
    "arrow_column",
    "build_synthetic_reference_dataset",
    "check_columns",
    "check_evaluation_dataset",
    "check_negative_prompts",
    "check_prompts",
    "encode_reference_dataset",
    "load_image",
    "load_video_frames",
    "prompt_column_of",
    "reference_column_of",
    "resize_center_crop",
    "to_rgb",
    "upscale_factor",
    "video_to_tensor",
    "with_prompt_column",
]
