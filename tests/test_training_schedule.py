"""Learning-rate schedules have the intended shape: warmup, cosine or stable-then-decay, and the extension."""

import pytest

from apertis_core.training.schedule import LRSchedule, build_schedule, extend_schedule


def rates(schedule: LRSchedule, start: int = 0) -> list[float]:
    return [schedule.lr_at(step) for step in range(start, schedule.total_steps)]


def test_cosine_warms_up_linearly_then_decays_monotonically_to_min_lr():
    lr = rates(build_schedule("cosine", 1e-3, 0.1, warmup_steps=10, total_steps=100, decay_fraction=0.2))
    assert lr[:10] == pytest.approx([1e-4 * (i + 1) for i in range(10)])  # first update already moves
    assert max(lr) == pytest.approx(1e-3) and lr.index(max(lr)) == 9
    assert all(a > b for a, b in zip(lr[9:], lr[10:], strict=False))
    assert lr[-1] == pytest.approx(1e-4)  # the last update uses min_lr
    assert lr[9 + 45] == pytest.approx(5.5e-4, rel=0.03)  # halfway through the decay: the mean of peak and min


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction():
    lr = rates(build_schedule("wsd", 1e-3, 0.0, warmup_steps=5, total_steps=100, decay_fraction=0.2))
    assert lr[4:80] == pytest.approx([1e-3] * 76)
    decay = lr[80:]
    steps = [a - b for a, b in zip(decay, decay[1:], strict=False)]
    assert steps == pytest.approx([steps[0]] * len(steps))  # linear
    assert decay[-1] == pytest.approx(0.0, abs=1e-12)


def test_extension_rewarms_from_where_the_run_ended_to_a_fraction_of_the_peak():
    old = build_schedule("cosine", 1e-3, 0.1, warmup_steps=10, total_steps=100, decay_fraction=0.2)
    new = extend_schedule(old, from_step=100, extra_steps=50, peak_lr=5e-4)
    lr = rates(new, start=100)
    assert new.total_steps == 150 and len(lr) == 50
    assert new.warmup_steps == 5  # a short re-warm: a tenth of the extension, at most the original warmup
    assert lr[0] == pytest.approx(1e-4 + (5e-4 - 1e-4) / 5)  # starts from the old final rate, not from 0
    assert max(lr) == pytest.approx(5e-4) and lr[-1] == pytest.approx(1e-4)


def test_schedule_round_trips_through_a_plain_dict():
    schedule = extend_schedule(build_schedule("wsd", 3e-4, 0.1, 20, 200, 0.3), 200, 100, 1.5e-4)
    assert LRSchedule.from_dict(schedule.to_dict()) == schedule


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="cosine"):
        build_schedule("linear", 1e-3, 0.1, 10, 100, 0.2)


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_a_run_shorter_than_its_warmup_still_peaks_midway_and_ends_at_min_lr(kind):
    schedule = build_schedule(kind, 1e-3, 0.1, warmup_steps=30, total_steps=20, decay_fraction=0.3)
    rates = [schedule.lr_at(step) for step in range(20)]
    assert rates.index(max(rates)) == 9 and max(rates) == pytest.approx(1e-3)  # 10 warm-up steps, not 30
    assert rates[-1] == pytest.approx(1e-4)
