"""Within-prompt diversity of samples: how far apart the samples of one prompt are, a collapse detector that needs no
download (docs/metrics.md, `eval_diversity`).

The features are the samples' final latents z ∈ R^D, the pipeline's own VAE representation (images and videos of
every model family have one, and the sampler ends there, so they cost nothing). For the K samples of a prompt,

    diversity = mean over pairs i < j of ‖z_i − z_j‖₂ / √D

(the root-mean-square difference per latent dimension), averaged over prompts. A model that collapses to one image
per prompt scores 0; the ratio to the base model's on the same seeds (`eval_diversity_ratio`) removes the scale of the
latent space. A latent distance is not perceptual: it also counts a shifted copy of the same image as different, so
it flags collapse, not a loss of semantic variety.
"""

from __future__ import annotations

import torch


def within_prompt_diversity(latents: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """Mean pairwise RMS distance between the `samples_per_prompt` consecutive samples of each prompt, averaged over
    prompts, in float32. `latents`: `(P · K, ...)`, prompt-major."""
    if samples_per_prompt < 2 or latents.shape[0] % samples_per_prompt:
        raise ValueError(
            f"Need ≥ 2 samples per prompt and a whole number of prompts, got {latents.shape[0]} samples in groups of "
            f"{samples_per_prompt}."
        )
    z = latents.float().reshape(-1, samples_per_prompt, latents[0].numel())
    distances = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist") / z.shape[-1] ** 0.5  # (P, K, K)
    pairs = torch.triu_indices(samples_per_prompt, samples_per_prompt, offset=1, device=z.device)
    return distances[:, pairs[0], pairs[1]].mean()
