"""The total_steps schedule: exactly `checkpoints` distinct steps, dense early, over any length of run."""

from __future__ import annotations

from hypothesis import given, strategies as st

from tb_convviz.schedule import DEFAULT_CHECKPOINTS, Schedule, spaced_steps


def scheduled(schedule: Schedule) -> list[int]:
    steps, step = [], schedule.next_due(-1)
    while step is not None:
        steps.append(step)
        step = schedule.next_due(step)
    return steps


@given(total=st.integers(1, 10**8), checkpoints=st.integers(2, 40))
def test_total_steps_gives_that_many_distinct_steps_dense_early(total, checkpoints):
    steps = scheduled(Schedule(total_steps=total, checkpoints=checkpoints))
    assert steps == spaced_steps(total, checkpoints)
    if total + 1 <= checkpoints:  # a run this short gets every step
        assert steps == list(range(total + 1))
        return
    assert len(steps) == checkpoints and len(set(steps)) == checkpoints
    assert steps[0] == 0 and steps[-1] == total and steps == sorted(steps)
    for i, step in enumerate(steps):
        quadratic = round(total * (i / (checkpoints - 1)) ** 2)
        # Never before the quadratic spacing; later only where it packs one checkpoint per step.
        assert quadratic <= step <= max(quadratic, i)


def test_short_runs_named_in_the_issue_get_16_checkpoints():
    for total in (16, 20, 64, 102):
        assert len(scheduled(Schedule(total_steps=total))) == DEFAULT_CHECKPOINTS
    assert scheduled(Schedule(total_steps=20)) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 20]
    assert scheduled(Schedule(total_steps=5)) == [0, 1, 2, 3, 4, 5]
