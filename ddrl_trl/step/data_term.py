"""The data term of one rollout batch (docs/concepts.md): each group's paired reference sample x̃0, noised to the noise
level of each trained step and batched into the denoiser forward that already carries the rollout states.

    x̃_t = add_noise(x̃0, ε, t_j),   L_data = mean_g w_g · mean_d (f_θ(x̃_t, t_j, c_g) − target(x̃0, ε, t_j))²

ε is the initial noise of the group's first rollout (`data_noise="rollout"`, the reference code's
`use_rl_sigma_and_noise`) or fresh seeded noise (`"random"`); t_j is the trained step's timestep (`data_timesteps=
"rollout"`) or a seeded random training timestep per group (`"random"`, the paper's formulation). w_g is the share of
the group's rows this process holds, so that with groups spanning processes the average over processes is the plain
mean over groups.

With prompt dropout p (`DDRLConfig.data_prompt_dropout`, on by default under classifier-free guidance) a group's
sample is conditioned at a trained step on the null conditioning (the pipeline's own unconditional input, not a
negative prompt) instead of its prompt with probability p, drawn per (group, trained step) from the batch's seed:
guided sampling also follows the unconditional model, and this anchors it to the data as the prompt's term anchors
the conditional one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import Conditioning
from .groups import GroupLayout
from .policy import drop_conditioning
from .rollout import SeededNoise


@dataclass
class DataTermBatch:
    """The reference side of the joint forward of one rollout batch.

    Attributes:
        ref_latents: `(G, ...)` x̃0, one per local group.
        noise: `(G, ...)` its noise ε.
        prompt_cond: `(G, ...)` the groups' prompt conditioning.
        weights: `(G,)` the share of each group's rows held by this process.
        groups: the global indices of the local groups (they seed the per-group draws).
        prompt_null: `(G, ...)` the null conditioning, with prompt dropout.
        prompt_dropout: the probability p of that dropout.
    """

    ref_latents: torch.Tensor
    noise: torch.Tensor
    prompt_cond: Conditioning
    weights: torch.Tensor
    groups: list[int]
    noise_source: SeededNoise
    random_timesteps: bool
    prompt_null: Conditioning | None = None
    prompt_dropout: float = 0.0

    @classmethod
    def build(
        cls,
        args,
        ref_latents: torch.Tensor | None,
        prompt_cond: Conditioning,
        layout: GroupLayout,
        noise: SeededNoise,
        like: torch.Tensor,
        prompt_null: Conditioning | None = None,
    ) -> DataTermBatch:
        """The data term of a batch whose rollout states are `like` (for device and dtype)."""
        if ref_latents is None:
            raise ValueError(
                "The data term (data_beta > 0) needs each prompt's paired reference sample, and this batch has none: "
                "the trainer was built with data_beta=0 (plain GRPO), which encodes no references. Build a new "
                "trainer with data_beta > 0 and a reference column (or ddrl_trl.build_synthetic_reference_dataset)."
            )
        ref_latents = ref_latents.to(like)
        shape = tuple(ref_latents.shape[1:])
        if args.data_noise == "rollout":  # the initial noise of the group's first rollout, wherever that row lives
            data_noise = noise.initial([g * args.num_generations for g in layout.groups], shape)
        else:
            data_noise = noise.group_noise(layout.groups, shape)
        return cls(
            ref_latents=ref_latents,
            noise=data_noise,
            prompt_cond=prompt_cond,
            weights=torch.tensor(layout.data_weights, device=like.device),
            groups=layout.groups,
            noise_source=noise,
            random_timesteps=args.data_timesteps == "random",
            prompt_null=prompt_null,
            prompt_dropout=args.resolved_data_prompt_dropout if prompt_null is not None else 0.0,
        )

    def dropped(self, position: int) -> torch.Tensor:
        """`(G,)` bool: which groups are trained unconditionally at the `position`-th trained step (u_g < p, with u_g
        uniform from the group's own seeded stream, so it does not depend on the process layout)."""
        device = self.ref_latents.device
        draws = [
            torch.rand(1, generator=self.noise_source.generator(f"data-drop{position}", g), device=device)
            for g in self.groups
        ]
        return torch.cat(draws) < self.prompt_dropout

    def cond(self, position: int) -> Conditioning:
        """The data rows' conditioning at the `position`-th trained step: the prompts, some dropped (`dropped`)."""
        if self.prompt_null is None or self.prompt_dropout == 0:
            return self.prompt_cond
        return drop_conditioning(self.prompt_cond, self.prompt_null, self.dropped(position))

    def timesteps(self, sampler, position: int, step_index: int) -> torch.Tensor:
        """`(G,)` noise levels of the data term at the `position`-th trained step (denoising step `step_index`)."""
        if self.random_timesteps:
            return torch.cat(
                [sampler.sample_timesteps(1, self.noise_source.generator(f"data-t{position}", g)) for g in self.groups]
            )
        return sampler.timesteps[step_index].expand(len(self.groups))
