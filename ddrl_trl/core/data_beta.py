"""Adaptive `data_beta`: a controller that holds the data term's diffusion-loss ratio to the base model at a target,
as the adaptive KL coefficient of PPO holds the KL (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", §2.2). docs/concepts.md has the design, its failure modes and the measurements.

Each optimiser step k measures r_k, the policy's diffusion loss on the step's noised reference rows over the base
model's on the same rows (the same x̃_t, t and conditioning: a paired ratio). The controller smooths it,

    s_k = m · s_{k−1} + (1 − m) · r_k                      (s_0 = r_0)

and moves β in log space in proportion to the relative error against the target ratio ρ*, Ziegler's
e = clip(d / d* − 1) with the divergence d = s − 1 and its target d* = ρ* − 1:

    e_k = clip((s_k − ρ*) / (ρ* − 1), −1, 1)
    β_{k+1} = clip(β_k · exp(η · e_k), β_min, β_max)

so β changes by at most a factor e^η per step (η = `DDRLConfig.data_beta_adapt_rate`), up when the policy has moved
further from the data than the target allows and down when it has not. The bounds keep a controller that has seen a
long quiet stretch from drifting so low that it needs many steps to recover (integral wind-up).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


@dataclass
class AdaptiveDataBeta:
    """The controller's state and update (pure: no tensors, no trainer).

    Args:
        value: β now (initially `DDRLConfig.data_beta`).
        target: the ratio ρ* to hold (> 1).
        rate: η, the largest change of log β per update.
        smoothing: m, the weight of the past in the smoothed signal, in [0, 1).
        min_value, max_value: the bounds of β.
        signal: the smoothed ratio s (None before the first update).
        updates: how many updates were applied.
    """

    value: float
    target: float
    rate: float = 0.05
    smoothing: float = 0.8
    min_value: float = 1e-6
    max_value: float = 1e6
    signal: float | None = None
    updates: int = 0

    def __post_init__(self):
        for name in ("value", "target", "rate", "smoothing", "min_value", "max_value"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"AdaptiveDataBeta.{name} must be finite, got {getattr(self, name)}.")
        if self.target <= 1:
            raise ValueError(f"The target loss ratio must be > 1 (a ratio to the base model's), got {self.target}.")
        if self.value <= 0:
            raise ValueError(f"An adaptive data_beta must start > 0 (it scales multiplicatively), got {self.value}.")
        if not 0 <= self.smoothing < 1 or self.rate <= 0:
            raise ValueError(f"Need 0 ≤ smoothing < 1 and rate > 0, got {self.smoothing} and {self.rate}.")
        if not 0 < self.min_value <= self.value <= self.max_value:
            raise ValueError(
                f"Need 0 < min_value ≤ value ≤ max_value, got {self.min_value}, {self.value}, {self.max_value}."
            )

    @classmethod
    def starting_at(cls, value: float, target: float, rate: float, range_factor: float = 100.0) -> AdaptiveDataBeta:
        """A controller starting at β = `value`, bounded to [value / range_factor, value · range_factor]."""
        bounds = {"min_value": value / range_factor, "max_value": value * range_factor}
        return cls(value=value, target=target, rate=rate, **bounds)

    def error(self, signal: float) -> float:
        """e = clip((s − ρ*) / (ρ* − 1), −1, 1): −1 at the base model's ratio 1 or below, +1 at 2ρ* − 1 or above."""
        return min(1.0, max(-1.0, (signal - self.target) / (self.target - 1)))

    def update(self, ratio: float) -> float:
        """Take one step's measured ratio r; return the new β. A non-finite or non-positive ratio (no data rows, a
        skipped step) changes nothing."""
        if not math.isfinite(ratio) or ratio <= 0:
            return self.value
        self.signal = ratio if self.signal is None else self.smoothing * self.signal + (1 - self.smoothing) * ratio
        moved = self.value * math.exp(self.rate * self.error(self.signal))
        self.value = min(self.max_value, max(self.min_value, moved))
        self.updates += 1
        return self.value

    def state_dict(self) -> dict:
        """Everything that decides the next updates (JSON-serialisable; checkpointed with the run)."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state) -> AdaptiveDataBeta:
        """A controller from a saved `state_dict()`, validated as a whole: `ValueError` naming what is wrong for
        anything but a dict of this class's fields holding finite numbers within their ranges (a file written by hand
        or damaged: a list, a string where a number belongs, a negative β, an unknown or missing field)."""
        if not isinstance(state, dict):
            raise ValueError(f"the controller state must be an object of its fields, got {type(state).__name__}")
        names = [spec.name for spec in fields(cls)]
        unknown = sorted(str(key) for key in state if key not in names)
        if unknown:
            raise ValueError(f"the controller state has unknown fields {unknown} (its fields: {names})")
        missing = [name for name in ("value", "target") if name not in state]
        if missing:
            raise ValueError(f"the controller state lacks {missing}")
        for name, value in state.items():
            if name == "signal" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"the controller's {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"the controller's {name} must be finite, got {value!r}")
        updates = state.get("updates", 0)
        if not isinstance(updates, int) or updates < 0:
            raise ValueError(f"the controller's updates must be a whole number ≥ 0, got {updates!r}")
        return cls(**state)  # validates the ranges and bounds

    def load_state_dict(self, state: dict) -> None:
        """Restore where a saved controller was — β, the smoothed signal, the count of updates — from its
        `state_dict()`; the target, rate, smoothing and bounds stay this controller's (the current configuration's),
        and β is clamped into its bounds. Refuses (`ValueError`) a state that is not a controller's or holds
        non-finite or out-of-range numbers (`from_state_dict`)."""
        restored = self.from_state_dict(state)
        self.value = min(self.max_value, max(self.min_value, restored.value))
        self.signal, self.updates = restored.signal, restored.updates
