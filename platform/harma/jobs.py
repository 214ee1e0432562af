"""Ray job submission of job files: `harma submit` and `harma jobs`.

    harma submit jobs/train_rsitmd.yaml [dotted.path=value ...] [--address http://HEAD:8265] [--no-wait]
    harma jobs list | status ID | logs ID [--follow] | stop ID        [--address ...]

`submit` validates the job file with its overrides locally (nothing is sent when it is invalid),
checks that the cluster's dashboard answers and accepts our credentials, then submits
`python -m harma <command> --config <file> <overrides>` through Ray's JobSubmissionClient with the
shared runtime environment `jobs/runtime_env.yaml` (the repository as working_dir), prints the job
id, follows the logs, and exits with the job's status (0 only for SUCCEEDED). The command follows
from the file's sections: `tune:` -> harma tune, `index:` -> harma index build, `eval:` ->
harma eval, otherwise harma train. The plain Ray equivalent is

    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml \\
        -- python -m harma train --config jobs/train_rsitmd.yaml

Address: `--address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else http://127.0.0.1:8265.
Token authentication (on by default for Ray 2.60 local clusters): the token is taken from
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, and RAY_AUTH_MODE=token is set for the
client when a token exists; a cluster that rejects it is reported before anything is submitted.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from harma.config import PlatformConfig, load_config

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV_FILE = REPO / "jobs" / "runtime_env.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(RuntimeError):
    """The cluster cannot take or report the job; the message says why."""


# --- pure parts ------------------------------------------------------------------------------
def job_command(cfg: PlatformConfig) -> list[str]:
    """The harma sub-command a job file runs, from its sections."""
    if cfg.tune is not None:
        return ["tune"]
    if cfg.index is not None:
        return ["index", "build"]
    if cfg.eval is not None:
        return ["eval"]
    return ["train"]


def entrypoint(job_file: str, overrides: list[str], cfg: PlatformConfig) -> str:
    """`python -m harma <command> --config <file relative to the working dir> <overrides>`."""
    return shlex.join(["python", "-m", "harma", *job_command(cfg), "--config", job_file, *overrides])


def load_runtime_env(path: Path = RUNTIME_ENV_FILE) -> dict[str, Any]:
    """The shared runtime env, validated by Ray's RuntimeEnv; working_dir made absolute."""
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    RuntimeEnv(**raw)  # raises on unknown fields or wrong types
    if raw.get("working_dir") and "://" not in raw["working_dir"]:
        raw["working_dir"] = str((Path(path).parent.parent / raw["working_dir"]).resolve())
    return raw


def job_file_in_working_dir(path: str, working_dir: str) -> str:
    """The job file's path relative to the working dir (the cluster sees only that folder)."""
    file = Path(path).resolve()
    try:
        return str(file.relative_to(Path(working_dir).resolve()))
    except ValueError:
        raise ValueError(f"{path}: a job file must be inside the uploaded working directory {working_dir} "
                         "(put it under jobs/)") from None


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def find_token() -> str | None:
    """The Ray auth token a client would send, from the standard places."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if path.is_file():
        return path.read_text().strip() or None
    return None


# --- the cluster -----------------------------------------------------------------------------
def use_token() -> str | None:
    """Find the token and turn on RAY_AUTH_MODE=token for this client (before Ray reads it)."""
    token = find_token()
    if token and not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = "token"
    return token


def connect(address: str | None):
    """A JobSubmissionClient for a reachable cluster that accepts our token (clear errors otherwise)."""
    import requests

    url = resolve_address(address)
    token = use_token()
    try:
        response = requests.get(f"{url}/api/version", timeout=5,
                                headers={"Authorization": f"Bearer {token}"} if token else {})
    except requests.RequestException as err:
        raise JobError(f"cannot reach the Ray dashboard at {url} ({type(err).__name__}); is the cluster up "
                       "and is this its dashboard address (default port 8265)?") from None
    if response.status_code in (401, 403):
        if token:
            raise JobError(f"the cluster at {url} rejected the auth token (from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                           "or ~/.ray/auth_token): use the cluster's token (`ray get-auth-token` on the head)")
        raise JobError(f"the cluster at {url} requires token authentication and no token was found: set "
                       "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (the head's `ray get-auth-token` prints it)")
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except Exception as err:  # Ray raises ConnectionError/RuntimeError/AuthenticationError here
        raise JobError(f"cannot use the Ray job API at {url}: {err}") from None


def follow_logs(client, job_id: str, out=sys.stdout) -> None:
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as err:  # the log stream can end abruptly when the job is stopped
        print(f"[harma] log stream ended: {type(err).__name__}", file=sys.stderr)


def wait_for(client, job_id: str, timeout_s: float | None = None) -> str:
    deadline = None if timeout_s is None else time.time() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or (deadline and time.time() > deadline):
            return status
        time.sleep(1)


def submit(job_file: str, overrides: list[str], address: str | None, wait: bool = True,
           runtime_env_file: Path = RUNTIME_ENV_FILE) -> int:
    """Validate, submit, follow; returns the exit code (0 = SUCCEEDED)."""
    use_token()  # Ray reads RAY_AUTH_MODE once, when it is first imported
    cfg = load_config(job_file, overrides)  # invalid file or override -> ConfigError, nothing sent
    runtime_env = load_runtime_env(runtime_env_file)
    relative = job_file_in_working_dir(job_file, runtime_env.get("working_dir", str(REPO)))
    command = entrypoint(relative, overrides, cfg)
    client = connect(address)
    submission_id = f"harma-{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    deadline = time.time() + 60
    while True:
        try:
            job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=submission_id,
                                       metadata={"harma_job_file": relative, "harma_run": cfg.run.name})
            break
        except RuntimeError as err:  # a head that just started has no job agent yet: retry a while
            if "try again later" not in str(err) or time.time() > deadline:
                raise JobError(f"the cluster refused the job: {err}") from None
            time.sleep(2)
    print(f"submitted {job_id}: {command}", flush=True)
    print(f"  follow: harma jobs logs {job_id} --follow    stop: harma jobs stop {job_id}", flush=True)
    if not wait:
        return 0
    follow_logs(client, job_id)
    status = wait_for(client, job_id)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    client = connect(address)
    rows = []
    for job in client.list_jobs():
        rows.append({"id": job.submission_id or job.job_id, "status": str(job.status.value),
                     "entrypoint": job.entrypoint, "start": job.start_time, "end": job.end_time,
                     "message": job.message})
    return sorted(rows, key=lambda r: r["start"] or 0)


def _job_info(client, address: str | None, job_id: str) -> dict[str, Any]:
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as err:
        raise JobError(f"no job {job_id!r} on {resolve_address(address)}: {err}") from None
    return {"id": job_id, "status": str(info.status.value), "message": info.message,
            "entrypoint": info.entrypoint}


def job_status(address: str | None, job_id: str) -> dict[str, Any]:
    return _job_info(connect(address), address, job_id)


def job_logs(address: str | None, job_id: str, follow: bool = False) -> None:
    client = connect(address)
    _job_info(client, address, job_id)  # a clear error for an unknown id
    if follow:
        follow_logs(client, job_id)
    else:
        sys.stdout.write(client.get_job_logs(job_id))


def stop_job(address: str | None, job_id: str) -> bool:
    client = connect(address)
    _job_info(client, address, job_id)
    return bool(client.stop_job(job_id))
