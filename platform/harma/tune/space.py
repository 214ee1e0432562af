"""Search spaces: the config's `tune.search_space` -> Ray Tune distributions, checked first.

    tune:
      search_space:
        model.adapter.rank: {grid: [4, 16, 64]}
        train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}
        model.adapter.layout: {choice: [official, paper]}

Every path is checked against the schema when the config loads; `check_space_values` also applies
each grid/choice value and both bounds of each range to the config, so a value of the wrong type
fails in a second, before anything is launched.
"""

from __future__ import annotations

import re
from typing import Any

from harma.config import ConfigError, PlatformConfig


def representative_values(spec: dict[str, list]) -> list:
    kind, values = next(iter(spec.items()))
    return list(values) if kind in ("grid", "choice") else [values[0], values[1]]


def check_space_values(cfg: PlatformConfig) -> None:
    """Raise ConfigError naming the path when a value of the space does not validate."""
    for path, spec in cfg.tune.search_space.items():
        for value in representative_values(spec):
            try:
                cfg.with_overrides({path: value})
            except ConfigError as err:
                raise ConfigError(f"tune.search_space {path} = {value!r} is not a valid value:\n{err}") from None


def to_param_space(cfg: PlatformConfig) -> dict[str, Any]:
    """{"overrides": {path: ray.tune distribution}} for the Tuner."""
    import ray.tune as tune

    makers = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    space = {}
    for path, spec in cfg.tune.search_space.items():
        kind, values = next(iter(spec.items()))
        space[path] = makers[kind](values)
    return {"overrides": space}


def trial_name(sweep_name: str, overrides: dict[str, Any]) -> str:
    """A deterministic, readable run name from the sampled values (valid as `run.name`)."""
    parts = []
    for path in sorted(overrides):
        value = overrides[path]
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{path.rsplit('.', 1)[-1]}{text}")
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower().replace(".", "p")).strip("-")
    return f"{sweep_name}-{slug}"[:100].rstrip("-")
