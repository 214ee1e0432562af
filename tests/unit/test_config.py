"""The config schema: overrides, errors naming dotted paths, round trips, every job file."""

import re
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
    assert checked == 14


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


def test_every_serve_config_validates_strictly():
    from harma.serve.configs import load_serve_config

    files = sorted((REPO / "serve_configs").rglob("*.yaml"))
    for path in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and "serve" in first, f"{path} must start with its command"
        raw = load_serve_config(path)
        assert raw["applications"][0]["import_path"] == "harma.serve.app:build_app"
    assert len(files) == 3


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["applications"][0]["deployments"][0].update(max_ongoing_request=3), "unknown key(s) ['max_ongoing_request']"),
    (lambda c: c["applications"][0]["deployments"][0]["autoscaling_config"].update(min_replica=1), "min_replica"),
    (lambda c: c["applications"][0]["deployments"][0]["autoscaling_config"].update(min_replicas=5, max_replicas=2), "autoscaling_config"),
    (lambda c: c["applications"][0]["deployments"][0]["logging_config"].update(enable_acces_log=False),
     "enable_acces_log"),
    (lambda c: c["applications"][0]["args"].update(max_top_k=0), "max_top_k"),
    (lambda c: c["applications"][0]["args"].update(index="x"), "index"),
    (lambda c: c["applications"][0].update(imprt_path="x"), "imprt_path"),
    (lambda c: c.pop("applications"), "no applications"),
])
def test_serve_config_errors_name_the_place(mutate, message):
    from harma.serve.configs import ServeConfigError, validate_serve_config

    raw = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    mutate(raw)
    with pytest.raises(ServeConfigError, match=re.escape(message)):
        validate_serve_config(raw, "local.yaml")


def test_resolve_local_paths_makes_harma_args_absolute(tmp_path, monkeypatch):
    from harma.serve.configs import resolve_local_paths

    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    out = resolve_local_paths(raw)
    args = out["applications"][0]["args"]
    assert args["checkpoint_uri"] == str(tmp_path / "runs" / "synth-adapt" / "best")
    assert args["index_uri"] == str(tmp_path / "runs" / "index-synth")
    assert raw["applications"][0]["args"]["index_uri"] == "runs/index-synth"  # input untouched
    gpu = resolve_local_paths(yaml.safe_load((REPO / "serve_configs" / "gpu.yaml").read_text()))
    assert gpu["applications"][0]["args"]["index_uri"].startswith("s3://")


def test_runtime_env_and_job_commands():
    from harma.jobs import entrypoint, job_command, job_file_in_working_dir, load_runtime_env

    env = load_runtime_env(REPO / "jobs" / "runtime_env.yaml")  # validated by Ray's RuntimeEnv
    assert env["working_dir"] == str(REPO) and env["env_vars"]["PYTHONPATH"] == "platform"
    assert "/data" in env["excludes"] and "/.venv" in env["excludes"]
    commands = {p.name: job_command(load_config(p)) for p in (REPO / "jobs").glob("*.yaml") if p.name != "runtime_env.yaml"}
    assert commands["sweep_rsitmd.yaml"] == ["tune"] and commands["index_synth.yaml"] == ["index", "build"]
    assert commands["eval_rsitmd.yaml"] == ["eval"] and commands["train_rsicd.yaml"] == ["train"]
    for name, command in commands.items():  # each file's first line names the command it runs
        first = (REPO / "jobs" / name).read_text().splitlines()[0]
        assert f"harma {' '.join(command)}" in first or "harma submit" in first or name == "demo.yaml", name
    cfg = load_config(REPO / "jobs" / "smoke_train.yaml")
    assert entrypoint("jobs/smoke_train.yaml", ["run.name=a b"], cfg) == \
        "python -m harma train --config jobs/smoke_train.yaml 'run.name=a b'"
    assert job_file_in_working_dir(str(REPO / "jobs" / "smoke_train.yaml"), str(REPO)) == "jobs/smoke_train.yaml"
    with pytest.raises(ValueError, match="must be inside the uploaded working directory"):
        job_file_in_working_dir("/etc/hosts", str(REPO))


def test_serve_overrides_reach_the_harma_app_by_shorthand_name_or_position():
    from harma.serve.configs import load_serve_config

    path = REPO / "serve_configs" / "local.yaml"
    raw = load_serve_config(path, ["args.index_uri=s3://b/idx", "applications.harma.args.max_top_k=7",
                                   "applications.0.deployments.Retriever.autoscaling_config.max_replicas=3",
                                   "http_options.port=9001"])
    app = raw["applications"][0]
    assert app["args"]["index_uri"] == "s3://b/idx" and app["args"]["max_top_k"] == 7
    assert app["deployments"][0]["autoscaling_config"]["max_replicas"] == 3
    assert raw["http_options"]["port"] == 9001
    assert load_serve_config(path)["applications"][0]["args"]["index_uri"] == "runs/index-synth"


@pytest.mark.parametrize("override,message", [
    ("args.max_top_kk=3", "max_top_kk"),                     # unknown ServeArgs field
    ("applications.nope.args.index_uri=x", "no element 'nope'"),
    ("args.max_top_k=-1", "max_top_k"),                       # ServeArgs' own bound
    ("applications", "dotted.path=value"),
])
def test_bad_serve_overrides_are_refused_naming_the_place(override, message):
    from harma.serve.configs import ServeConfigError, load_serve_config

    with pytest.raises(ServeConfigError, match=re.escape(message)):
        load_serve_config(REPO / "serve_configs" / "local.yaml", [override])
