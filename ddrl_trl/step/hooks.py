"""Observation points of a DDRL run, for tests, benchmarks and debugging tools: callables registered for
an event are called with what the step computed there, in registration order, on every trainer in the process (as
torch's global module hooks). What they return is ignored, and an exception they raise propagates (a test's way of
saying "this must not happen"); a fault-injection test may change `terms` in place (a NaN loss).

Events and their keyword arguments:

- `"reference_encoding"`: `split` ("training" or "evaluation"), before a dataset's reference samples are encoded
  (the trainer's one-off work on the data: checks of the inputs must come before it).
- `"rollout_start"`: `rows` (the global rows about to be rolled out, before any denoiser call).
- `"rollout_end"`: `rollout` (`step.rollout.Rollout`) and `scores` (`(rows, F)` rewards of this process's rows).
- `"step_terms"`: `step_index` (the trained denoising step) and `terms` (`step.loss.StepTerms`: loss, policy
  loss, ratio, clipped fraction, data and KL terms), before the backward.

    with observing("step_terms", lambda step_index, terms: ratios.append(terms.ratio.detach())):
        trainer.train()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

#: The events a step emits.
EVENTS = ("reference_encoding", "rollout_start", "rollout_end", "step_terms")

_observers: dict[str, list[Callable[..., object]]] = {event: [] for event in EVENTS}


def _check(event: str) -> None:
    if event not in _observers:
        raise ValueError(f"Unknown step event {event!r}; the events are {', '.join(EVENTS)}.")


class Registration:
    """A registered observer; `remove()` unregisters it."""

    def __init__(self, event: str, callback: Callable[..., object]):
        self.event, self.callback = event, callback

    def remove(self) -> None:
        if self.callback in _observers[self.event]:
            _observers[self.event].remove(self.callback)


def register(event: str, callback: Callable[..., object]) -> Registration:
    """Call `callback(**payload)` at every `event` of any trainer in this process, until `.remove()`."""
    _check(event)
    _observers[event].append(callback)
    return Registration(event, callback)


@contextlib.contextmanager
def observing(event: str, callback: Callable[..., object]) -> Iterator[Registration]:
    """`register` for the duration of the block."""
    registration = register(event, callback)
    try:
        yield registration
    finally:
        registration.remove()


def emit(event: str, **payload) -> None:
    """Tell the observers of `event` (nothing to do, and no cost beyond a dict lookup, when there are none)."""
    for callback in list(_observers[event]):
        callback(**payload)
