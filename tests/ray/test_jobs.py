"""Job submission against a real `ray start --head` cluster on loopback with token authentication:
the smoke training job succeeds and leaves its checkpoint in storage, a failing job is reported as
failed with a non-zero exit, and bad addresses, tokens and job files fail before anything is sent."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_processes_of(marker: str) -> None:
    import psutil

    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["pid"] != me and any(marker in part for part in proc.info["cmdline"] or []):
            try:
                proc.kill()
            except psutil.Error:
                pass


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head started by `ray start --head` with its own token, temp dir and ports."""
    temp = tempfile.mkdtemp(prefix="hj-")
    token = os.urandom(16).hex()
    dashboard = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_TMPDIR": temp,
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "DS_ACCELERATOR": "cpu"}
    started = subprocess.run([str(VENV_BIN / "ray"), "start", "--head", "--port", str(_free_port()),
                              "--dashboard-port", str(dashboard), "--dashboard-host", "127.0.0.1",
                              "--include-dashboard", "true", "--num-cpus", "4", "--temp-dir", temp,
                              # every port of its own: another Ray on this machine holds the defaults
                              "--dashboard-agent-listen-port", str(_free_port()),
                              "--dashboard-agent-grpc-port", str(_free_port()),
                              "--runtime-env-agent-port", str(_free_port()),
                              "--metrics-export-port", str(_free_port()),
                              "--node-manager-port", str(_free_port()),
                              "--object-manager-port", str(_free_port()),
                              "--ray-client-server-port", str(_free_port()),
                              "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    yield {"address": f"http://127.0.0.1:{dashboard}", "token": token, "temp": temp}
    _kill_processes_of(temp)  # never `ray stop`: it would stop every Ray on this machine


@pytest.fixture(scope="module")
def store(synth_root, tmp_path_factory):
    from harma.data.prepare import prepare_dataset

    out = str(tmp_path_factory.mktemp("jobs") / "store")
    prepare_dataset(synth_root, out, ["train", "val", "test"])
    return out


def _harma(args: list[str], token: str | None, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k not in ("RAY_ADDRESS",)}
    env["HOME"] = str(home)  # no ~/.ray/auth_token of this machine's other clusters
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "harma", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_smoke_job_succeeds_and_checkpoints_then_a_failing_job_fails(head, store, tmp_path):
    runs = tmp_path / "runs"
    t0 = time.time()
    done = _harma(["submit", "jobs/smoke_train.yaml", f"data.prepared_uri={store}", f"run.output_dir={runs}",
                   "--address", head["address"]], head["token"], tmp_path)
    seconds = time.time() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = done.stdout.split("submitted ", 1)[1].split(":", 1)[0]
    assert job_id.startswith("harma-smoke-train-")
    assert f"job {job_id}: SUCCEEDED" in done.stdout
    assert "best checkpoint:" in done.stdout  # the job's own output, followed live
    checkpoints = sorted(p for p in (runs / "smoke-train").glob("checkpoint_*") if p.is_dir())
    assert checkpoints and (checkpoints[-1] / "adapter.safetensors").stat().st_size > 0
    assert (runs / "smoke-train" / "report" / "metrics.json").exists()
    print(f"smoke job round trip: {seconds:.1f} s")

    status = _harma(["jobs", "status", job_id, "--address", head["address"]], head["token"], tmp_path)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and "jobs/smoke_train.yaml" in status.stdout
    listed = _harma(["jobs", "list", "--address", head["address"]], head["token"], tmp_path)
    assert job_id in listed.stdout and "1 job(s)" in listed.stdout
    logs = _harma(["jobs", "logs", job_id, "--address", head["address"]], head["token"], tmp_path)
    assert "best checkpoint:" in logs.stdout

    failed = _harma(["submit", "jobs/smoke_train.yaml", f"data.prepared_uri={tmp_path / 'no-such-store'}",
                     f"run.output_dir={runs}", "run.name=smoke-fail", "--address", head["address"]],
                    head["token"], tmp_path)
    assert failed.returncode == 1, failed.stdout[-2000:]
    assert ": FAILED" in failed.stdout and "no-such-store" in failed.stdout  # the job's own error, shown
    failed_id = failed.stdout.split("submitted ", 1)[1].split(":", 1)[0]
    status = _harma(["jobs", "status", failed_id, "--address", head["address"]], head["token"], tmp_path)
    assert status.returncode == 1 and "FAILED" in status.stdout


def test_no_wait_then_stop(head, store, tmp_path):
    started = _harma(["submit", "jobs/smoke_train.yaml", f"data.prepared_uri={store}",
                      f"run.output_dir={tmp_path / 'runs'}", "run.name=smoke-stop", "train.epochs=50",
                      "--no-wait", "--address", head["address"]], head["token"], tmp_path)
    assert started.returncode == 0, started.stderr[-2000:]
    job_id = started.stdout.split("submitted ", 1)[1].split(":", 1)[0]
    assert "job " + job_id + ":" not in started.stdout  # returned without waiting for the end
    stopped = _harma(["jobs", "stop", job_id, "--address", head["address"]], head["token"], tmp_path)
    assert stopped.returncode == 0 and f"{job_id}: stop requested" in stopped.stdout
    deadline = time.time() + 60
    status = None
    while time.time() < deadline:
        status = _harma(["jobs", "status", job_id, "--address", head["address"]], head["token"], tmp_path)
        if "STOPPED" in status.stdout:
            break
        time.sleep(2)
    assert "STOPPED" in status.stdout and status.returncode == 1


def _job_count(head, tmp_path) -> int:
    listed = _harma(["jobs", "list", "--address", head["address"]], head["token"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    return int(listed.stdout.strip().splitlines()[-1].split()[0])


def test_bad_address_token_or_job_file_fail_before_submitting(head, tmp_path):
    before = _job_count(head, tmp_path)
    args = ["submit", "jobs/smoke_train.yaml", "--address"]
    unreachable = _harma(args + [f"http://127.0.0.1:{_free_port()}"], head["token"], tmp_path)
    assert unreachable.returncode == 2 and "cannot reach the Ray dashboard" in unreachable.stderr
    missing = _harma(args + [head["address"]], None, tmp_path)
    assert missing.returncode == 2 and "requires token authentication and no token was found" in missing.stderr
    wrong = _harma(args + [head["address"]], "not-the-token", tmp_path)
    assert wrong.returncode == 2 and "rejected the auth token" in wrong.stderr
    invalid = _harma(["submit", "jobs/smoke_train.yaml", "train.epoch=1", "--address", head["address"]],
                     head["token"], tmp_path)
    assert invalid.returncode == 2 and "did you mean 'train.epochs'" in invalid.stderr
    outside = tmp_path / "job.yaml"
    outside.write_text((REPO / "jobs" / "smoke_train.yaml").read_text())
    elsewhere = _harma(["submit", str(outside), "--address", head["address"]], head["token"], tmp_path)
    assert elsewhere.returncode == 2 and "must be inside the uploaded working directory" in elsewhere.stderr
    unknown = _harma(["jobs", "status", "harma-nope", "--address", head["address"]], head["token"], tmp_path)
    assert unknown.returncode == 2 and "no job 'harma-nope'" in unknown.stderr
    assert _job_count(head, tmp_path) == before  # nothing of the above reached the cluster
