"""Search spaces: paths checked when the config loads, values checked before launch, names."""

import pytest

from harma.config import ConfigError, load_config
from harma.tune.space import check_space_values, to_param_space, trial_name


def _cfg(space, *extra):
    return load_config(None, [f"tune={{search_space: {space}}}", *extra])


def test_unknown_path_is_rejected_at_load_with_a_hint():
    with pytest.raises(ConfigError, match="did you mean 'model.adapter.rank'"):
        _cfg("{model.adapter.rnak: {grid: [4, 8]}}")


@pytest.mark.parametrize("space, message", [
    ("{model.adapter.rank: {grid: []}}", "grid needs values"),
    ("{model.adapter.rank: {lattice: [4]}}", "exactly one of grid, choice"),
    ("{train.optimizer.lr: {loguniform: [0, 1.0e-3]}}", "positive low bound"),
    ("{train.optimizer.lr: {uniform: [1.0e-3, 1.0e-4]}}", "low < high"),
    ("{run.name: {choice: [a, b]}}", "cannot be searched"),
])
def test_malformed_spaces(space, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(space)


def test_values_of_the_wrong_type_fail_before_launch():
    cfg = _cfg("{model.adapter.rank: {grid: [8, many]}}")
    with pytest.raises(ConfigError, match="model.adapter.rank = 'many' is not a valid value"):
        check_space_values(cfg)
    check_space_values(_cfg("{model.adapter.rank: {grid: [8, 16]}, train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}}"))


def test_param_space_and_deterministic_names():
    cfg = _cfg("{model.adapter.rank: {grid: [8, 16]}, train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}}")
    space = to_param_space(cfg)["overrides"]
    assert space["model.adapter.rank"] == {"grid_search": [8, 16]}
    assert space["train.optimizer.lr"].lower == pytest.approx(1e-4)
    name = trial_name("sweep", {"model.adapter.rank": 16, "train.optimizer.lr": 0.00312})
    assert name == trial_name("sweep", {"train.optimizer.lr": 0.00312, "model.adapter.rank": 16})
    assert name == "sweep-rank16-lr0p00312"
    load_config(None, [f"run.name={name}"])  # a valid run name
