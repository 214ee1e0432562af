"""The config schema: overrides, errors naming dotted paths, round trips, every job file."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from harma.cli import main
from harma.config import ConfigError, PlatformConfig, check_path, load_config, parse_override

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_paper_recipe():
    cfg = PlatformConfig()
    assert cfg.model.backbone.arch == "ViT-B-32"
    assert (cfg.model.adapter.rank, cfg.model.adapter.mini_rank) == (128, 64)
    assert cfg.model.adapter.gate_init == 0.6
    assert cfg.train.optimizer.betas == (0.9, 0.98)
    assert (cfg.train.loss.triplet_margin, cfg.train.loss.triplet_gamma) == (0.2, 2.0)


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("run: {name: job-a}\ntrain: {steps: 10}\n")
    cfg = load_config(path, ["train.optimizer.lr=3e-4", "model.backbone.weights_uri=null",
                             "train.optimizer.betas=[0.8, 0.9]", "model.adapter.layout=paper"])
    assert cfg.run.name == "job-a" and cfg.train.steps == 10
    assert cfg.train.optimizer.lr == pytest.approx(3e-4)
    assert cfg.model.backbone.weights_uri is None
    assert cfg.train.optimizer.betas == (0.8, 0.9)
    assert cfg.model.adapter.layout == "paper"


def test_unknown_key_in_file_names_the_dotted_path_and_suggests(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  adapter:\n    rnak: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.adapter.rnak" in str(err.value)
    assert "did you mean 'model.adapter.rank'" in str(err.value)


def test_unknown_override_is_rejected_before_validation():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.optimiser\.lr'.*optimizer"):
        load_config(None, ["train.optimiser.lr=1"])
    with pytest.raises(ConfigError, match="train.steps is a value, not a section"):
        check_path("train.steps.x")


def test_wrong_type_names_the_path(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.steps" in str(err.value) and "'many'" in str(err.value)
    with pytest.raises(ConfigError, match="model.adapter.layout"):
        load_config(None, ["model.adapter.layout=diagonal"])
    with pytest.raises(ConfigError, match="rank .* divisible by heads"):
        load_config(None, ["model.adapter.rank=10", "model.adapter.heads=4"])


def test_bad_override_syntax_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        parse_override("train.steps")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, ["run.name=Bad Name"])


def test_round_trip_and_frozen():
    cfg = PlatformConfig().with_overrides({"model.adapter.rank": 32, "run.name": "x"})
    assert PlatformConfig.model_validate(cfg.to_dict()) == cfg
    assert PlatformConfig.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg
    with pytest.raises(ValidationError):
        cfg.train.steps = 5  # type: ignore[misc]


def test_every_job_file_validates():
    files = sorted((REPO / "jobs").rglob("*.yaml"))
    checked = 0
    for path in files:
        if path.name == "runtime_env.yaml":
            continue
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and "harma " in first, f"{path} must start with its command"
        load_config(path)
        checked += 1
    assert checked == 5


def test_demo_job_file_equals_builtin_demo_settings():
    from harma.demo import demo_config

    assert load_config(REPO / "jobs" / "demo.yaml") == demo_config()


def test_cli_config_validate_and_show(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("train: {steps: 7}\n")
    assert main(["config", "validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["config", "show", str(path), "train.batch_size=16"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["steps"] == 7 and shown["train"]["batch_size"] == 16
    path.write_text("train: {stepz: 7}\n")
    assert main(["config", "validate", str(path)]) == 2
    assert "train.stepz" in capsys.readouterr().err


def test_global_batch_must_split_over_every_elastic_worker_count():
    with pytest.raises(ConfigError, match=r"does not for \[3\]"):
        load_config(None, ["train.batch_size=428", "train.workers.min=2", "train.workers.max=4"])
    with pytest.raises(ConfigError, match="must not exceed max"):
        load_config(None, ["train.workers.min=3", "train.workers.max=2"])
    load_config(None, ["train.batch_size=432", "train.workers.min=2", "train.workers.max=4"])
