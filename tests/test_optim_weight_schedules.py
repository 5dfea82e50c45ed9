"""Loss-weight schedules and after/before/every gates at their boundary steps (steps are 1-based)."""
import pytest

from dlas.errors import ConfigError
from dlas.trainer.schedules import Gate, build_weight

PATH = "steps.gen.losses.gan.weight"


def test_a_number_is_a_constant_weight():
    weight = build_weight(5e-3, PATH)
    assert weight(1) == weight(10**6) == 5e-3


def test_linear_holds_from_until_start_and_reaches_to_at_end():
    weight = build_weight({"schedule": "linear", "from": 0.0, "to": 1.0, "start": 100, "end": 200}, PATH)
    assert [weight(s) for s in (1, 100, 150, 200, 10**6)] == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_cosine_is_half_way_in_the_middle_and_flat_at_both_ends():
    weight = build_weight({"schedule": "cosine", "from": 2.0, "to": 0.0, "start": 0, "end": 100}, PATH)
    assert weight(0) == 2.0 and weight(50) == pytest.approx(1.0) and weight(100) == 0.0
    # Near the ends it moves slowly: a straight line would be 0.1 away from its end values here.
    assert 2.0 - weight(5) < 0.05 and weight(95) < 0.05


def test_step_jumps_right_after_start():
    weight = build_weight({"schedule": "step", "from": 0.0, "to": 0.1, "start": 1000}, PATH)
    assert (weight(1000), weight(1001)) == (0.0, 0.1)


def test_step_schedule_rejects_an_end():
    with pytest.raises(ConfigError, match=rf"{PATH}\.end: .*takes no 'end'"):
        build_weight({"schedule": "step", "from": 0.0, "to": 1.0, "start": 1, "end": 5}, PATH)


def test_misspelt_schedule_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=rf"{PATH}\.strat: .*did you mean 'start'"):
        build_weight({"schedule": "linear", "from": 0.0, "to": 1.0, "strat": 1, "end": 5}, PATH)


def test_unknown_schedule_kind_is_named():
    with pytest.raises(ConfigError, match=rf"{PATH}\.schedule: .*did you mean 'cosine'"):
        build_weight({"schedule": "cosin", "from": 0.0, "to": 1.0, "start": 1, "end": 5}, PATH)


def test_missing_end_is_named():
    with pytest.raises(ConfigError, match=rf"{PATH}\.end: .*needs 'end'"):
        build_weight({"schedule": "linear", "from": 0.0, "to": 1.0, "start": 1}, PATH)


def test_end_must_come_after_start():
    with pytest.raises(ConfigError, match=rf"{PATH}\.end"):
        build_weight({"schedule": "linear", "from": 0.0, "to": 1.0, "start": 5, "end": 5}, PATH)


@pytest.mark.parametrize("spec", ["0.1", True, None, [0.1]])
def test_a_weight_that_is_neither_number_nor_schedule_is_a_config_error(spec):
    with pytest.raises(ConfigError, match=PATH):
        build_weight(spec, PATH)


def test_gate_after_starts_once_that_many_steps_are_done():
    gate = Gate(after=100000)
    assert (gate.active(100000), gate.active(100001)) == (False, True)


def test_gate_before_stops_once_that_many_steps_are_done():
    gate = Gate(before=200)
    assert (gate.active(1), gate.active(200), gate.active(201)) == (True, True, False)


def test_gate_after_and_before_runs_exactly_their_difference_in_steps():
    gate = Gate(after=100, before=200)
    assert sum(gate.active(s) for s in range(1, 1000)) == 100


def test_gate_every_runs_on_multiples():
    assert [s for s in range(1, 13) if Gate(every=4).active(s)] == [4, 8, 12]


def test_an_empty_gate_is_always_active():
    assert all(Gate().active(s) for s in (0, 1, 10**7))


def test_gate_rejects_before_not_after_after():
    with pytest.raises(ConfigError, match=r"steps\.d\.before: .*greater than 'after: 10'"):
        Gate(after=10, before=10, path="steps.d")


@pytest.mark.parametrize("key, value", [("after", -1), ("every", 0), ("before", 1.5), ("after", "100k")])
def test_gate_rejects_values_that_are_not_step_counts(key, value):
    with pytest.raises(ConfigError, match=rf"steps\.d\.{key}: "):
        Gate(**{key: value}, path="steps.d")
