"""The step's observation points (`ddrl_trl.step.hooks`): observers see the payload in registration order, are gone
after their block or `remove()`, and an unknown event is refused naming the known ones."""

import pytest

from ddrl_trl.step.hooks import emit, observing, register


def test_observers_are_called_in_order_and_removed():
    seen = []
    first = register("rollout_start", lambda rows: seen.append(("first", list(rows))))
    with observing("rollout_start", lambda rows: seen.append(("second", list(rows)))):
        emit("rollout_start", rows=range(2))
    emit("rollout_start", rows=[5])
    first.remove()
    first.remove()  # removing twice is harmless
    emit("rollout_start", rows=[7])
    assert seen == [("first", [0, 1]), ("second", [0, 1]), ("first", [5])]


def test_an_observer_exception_propagates_and_the_block_still_unregisters():
    def forbidden(rows):
        raise AssertionError("no rollout here")

    with pytest.raises(AssertionError, match="no rollout here"), observing("rollout_start", forbidden):
        emit("rollout_start", rows=[0])
    emit("rollout_start", rows=[0])  # gone


def test_an_unknown_event_is_refused_with_the_known_ones():
    with pytest.raises(
        ValueError, match="Unknown step event 'rollout'.*reference_encoding, rollout_start, rollout_end, step_terms"
    ):
        register("rollout", print)
