"""cluster.yaml passes Ray's own cluster-config schema and the launcher's checks (no cloud calls)."""

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _validate(cfg: dict) -> None:
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # the raw file: unknown keys, missing resources, types
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` checks after merging defaults


def test_cluster_yaml_passes_rays_validation():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    _validate(cfg)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no training
    assert {"worker.gpu", "worker.cpu"} <= set(types)
    assert all(types[t]["min_workers"] <= types[t]["max_workers"] for t in ("worker.gpu", "worker.cpu"))
    assert cfg["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert any("pip install" in c and "harma-platform" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["/home/ray/harma-platform"] == "."


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["available_node_types"]["worker.gpu"].update(min_worker=1), "Additional properties"),
    (lambda c: c["available_node_types"]["worker.cpu"].pop("resources"), "'resources' is a required property"),
    (lambda c: c.update(head_node_type="head.gpu"), "head_node_type"),
    (lambda c: c.pop("provider"), "'provider' is a required property"),
])
def test_planted_mistakes_are_caught(mutate, message):
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    mutate(cfg)
    with pytest.raises(Exception, match=message):
        _validate(cfg)


def test_every_ray_start_sets_up_serves_haproxy_ingress():
    from harma.serve.ingress import HAPROXY_FLAG, RETRY_ON, RETRY_VAR, SAME_LOOP_FLAG

    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        [start] = [cmd for cmd in cfg[key] if "ray start" in cmd]
        before_start = start.split("ray start")[0]
        assert f"{HAPROXY_FLAG}=1" in before_start and f"{SAME_LOOP_FLAG}=0" in before_start, (key, start)
        assert f'{RETRY_VAR}="{RETRY_ON}"' in before_start, (key, start)


def test_every_ray_start_keeps_data_worker_processes_between_epochs():
    from harma.train.driver import WORKER_LIMIT_VAR, WORKERS_PER_CPU

    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        [start] = [cmd for cmd in cfg[key] if "ray start" in cmd]
        assert f"{WORKER_LIMIT_VAR}=$(({WORKERS_PER_CPU} * $(nproc)))" in start.split("ray start")[0], start
