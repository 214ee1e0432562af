"""Serve config files (`serve_configs/*.yaml`): strict validation, and resolution for local runs.

    harma serve serve_configs/local.yaml [--address ADDR] [dotted.path=value ...]

Overrides are dotted paths into the file (`applications.harma.args.index_uri=s3://...`: a list
element by its `name` or its position), values parsed as YAML; `args.X=...` is short for the args
of the file's one harma application. The result is validated as strictly as the file.

Ray 2.60's `ServeDeploySchema` silently ignores unknown keys and does not check autoscaling
dicts, so a typo would deploy with defaults. `validate_serve_config` rejects unknown keys at every
level, checks autoscaling configs with Ray's own `AutoscalingConfig`, and validates the `args` of
every application built by `harma.serve.app:build_app` with `ServeArgs`. No torch import here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from harma import storage

HARMA_IMPORT_PATH = "harma.serve.app:build_app"
_PATH_ARGS = ("checkpoint_uri", "index_uri")


class ServeConfigError(ValueError):
    """A serve config file is invalid; the message names the file and the place."""


def _known(model) -> set[str]:
    return set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}


def _check_keys(raw: dict, model, where: str) -> None:
    unknown = sorted(set(raw) - _known(model))
    if unknown:
        raise ServeConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(_known(model))}")


def validate_serve_config(raw: Any, source: str = "serve config") -> dict[str, Any]:
    """Strictly validate a Serve config dict (Ray's schema + unknown keys + ServeArgs); returns it."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    from harma.serve.api import ServeArgs

    if not isinstance(raw, dict):
        raise ServeConfigError(f"{source}: top level must be a mapping")
    if not raw.get("applications"):
        raise ServeConfigError(f"{source}: no applications")
    try:
        _check_keys(raw, ServeDeploySchema, f"{source}")
        for app in raw.get("applications") or []:
            where = f"{source}: application {app.get('name', '?')!r}"
            _check_keys(app, ServeApplicationSchema, where)
            for dep in app.get("deployments") or []:
                dwhere = f"{where} deployment {dep.get('name', '?')!r}"
                _check_keys(dep, DeploymentSchema, dwhere)
                if isinstance(dep.get("autoscaling_config"), dict):
                    _check_keys(dep["autoscaling_config"], AutoscalingConfig, f"{dwhere} autoscaling_config")
                    try:
                        AutoscalingConfig(**dep["autoscaling_config"])
                    except (ValidationError, ValueError) as err:
                        raise ServeConfigError(f"{dwhere} autoscaling_config: {err}") from None
            if app.get("import_path") == HARMA_IMPORT_PATH:
                try:
                    ServeArgs.model_validate(app.get("args") or {})
                except ValidationError as err:
                    raise ServeConfigError(f"{where} args: {err}") from None
        ServeDeploySchema.model_validate(raw)
    except ValidationError as err:
        raise ServeConfigError(f"{source}: {err}") from None
    return raw


def load_serve_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ServeConfigError(f"cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ServeConfigError(f"{path} is not valid YAML: {err}") from None
    if overrides:
        raw = apply_serve_overrides(raw, overrides, str(path))
    return validate_serve_config(raw, str(path) + (" with overrides" if overrides else ""))


def apply_serve_overrides(raw: Any, overrides: list[str], source: str = "serve config") -> dict[str, Any]:
    """A copy of a Serve config dict with `dotted.path=value` overrides applied (see module doc)."""
    from harma.config import ConfigError, parse_override

    out = copy.deepcopy(raw)
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError as err:
            raise ServeConfigError(str(err)) from None
        parts = path.split(".")
        if parts[0] == "args":
            apps = [a for a in out.get("applications") or [] if a.get("import_path") == HARMA_IMPORT_PATH]
            if len(apps) != 1:
                raise ServeConfigError(f"override {path}: 'args.' needs exactly one harma application in "
                                       f"{source}, it has {len(apps)}; name it: applications.NAME.args...")
            node: Any = apps[0]
        else:
            node = out
        *walk, last = parts
        for i, key in enumerate(walk):
            node = _child(node, key, ".".join(parts[: i + 1]))
        if isinstance(node, list):
            node[_list_index(node, last, path)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ServeConfigError(f"override {path}: {'.'.join(parts[:-1])} is not a mapping")
    return out


def _list_index(items: list, key: str, where: str) -> int:
    if key.isdigit() and int(key) < len(items):
        return int(key)
    named = [i for i, item in enumerate(items) if isinstance(item, dict) and item.get("name") == key]
    if not named:
        names = [item.get("name") for item in items if isinstance(item, dict)]
        raise ServeConfigError(f"override {where}: no element {key!r} (names: {names}, or 0..{len(items) - 1})")
    return named[0]


def _child(node: Any, key: str, where: str) -> Any:
    """`node[key]` (a list element by name or position), a new mapping where a key is missing."""
    if isinstance(node, list):
        return node[_list_index(node, key, where)]
    if not isinstance(node, dict):
        raise ServeConfigError(f"override {where}: its parent is not a mapping")
    if key not in node or node[key] is None:
        node[key] = {}
    return node[key]


def resolve_local_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy whose harma apps' local checkpoint/index paths are absolute (replicas run elsewhere)."""
    out = copy.deepcopy(raw)
    for app in out.get("applications") or []:
        if app.get("import_path") == HARMA_IMPORT_PATH:
            args = app.setdefault("args", {})
            for key in _PATH_ARGS:
                if key in args:
                    args[key] = storage.absolute(args[key])
            for dep in app.get("deployments") or []:
                uri = (dep.get("user_config") or {}).get("index_uri")
                if uri:
                    dep["user_config"]["index_uri"] = storage.absolute(uri)
    return out
