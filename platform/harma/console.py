"""What the console shows: harma's own progress and errors; Ray's internals stay in Ray's log files.

    gate_native_stderr()                  # `harma` / `python -m harma`: Ray's C++ log lines off the console
    ensure_ray()                          # harma.train.driver: log_to_driver off, Ray's loggers quiet
    with WorkerLogRelay() as relay:       # the driver: prints the workers' harma lines as they come
        TorchTrainer(..., train_loop_config={..., "console": relay.handle})
    attach_relay(loop_config["console"])  # in a worker: its `harma` log records go to the driver

Ray forwards every worker's stdout and stderr to the driver (`log_to_driver`), which put hundreds of
Ray Train, Ray Data, controller and raylet lines, with ANSI prefixes, between harma's own progress
lines. harma starts Ray without that forwarding and sends its workers' `harma.*` log records (rank
0's progress, every rank's warnings) through a Ray queue to the driver, which logs them as its own.
Ray's log folder is printed once when harma starts a cluster.

Three more sources reach a driver's console whatever `log_to_driver` says, and are handled here:
* Ray's Python loggers, some of which reset their level when imported (`import ray.serve` sets
  Serve's to INFO and gives it its own handler): `quiet_ray_loggers` puts a threshold filter on each,
  which survives such a reset;
* errors the cluster pushes to the driver, which Ray prints as `(raylet) ...` lines with ANSI colour:
  `route_ray_error_messages` logs them through harma's logger instead, as `Ray: ...` warnings, and
  keeps Ray's notices that a failed task will be retried (a Serve controller's shutdown makes one)
  at DEBUG;
* the C++ core's own log lines (`[2026-12-05 02:43:12,750 E 3342 3342] core_worker.cc:2465: ...`),
  which it writes to the driver's stderr besides its log file `python-core-driver-*.log`:
  `gate_native_stderr` passes the process's stderr through a small filter process that drops those
  lines (FATAL ones excepted) and passes everything else on.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import subprocess
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
RAW_STDERR_VAR = "HARMA_RAW_STDERR"  # set to 1: the process's stderr is not filtered
# Ray's notice that a failed task is retried (its caller sees the outcome). Kept at DEBUG: no Ray
# log file holds it either (checked on the demo's session logs), so by default it is not kept.
RETRY_NOTICE = re.compile(r"There are (infinite|\d+) retries remaining, so the task will be retried")


class _Threshold(logging.Filter):
    """Drops records below `level`: a logger filter, so it holds when Ray resets the logger's level."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def quiet_ray_loggers(level: int = logging.WARNING) -> None:
    """Ray's own Python loggers in this process at `level` (their INFO lines: Ray's log files);
    Ray Data's at ERROR (its warnings here are notices such as 'Progress bars disabled'). Holds
    when a Ray module imported later resets its logger (`import ray.serve` does)."""
    for name in RAY_LOGGERS:
        threshold = max(level, logging.ERROR) if name == "ray.data" else level
        logger = logging.getLogger(name)
        logger.setLevel(threshold)
        for old in [f for f in logger.filters if isinstance(f, _Threshold)]:
            logger.removeFilter(old)
        logger.addFilter(_Threshold(threshold))


def route_ray_error_messages() -> None:
    """Errors the cluster pushes to this driver (worker deaths, OOM kills, failed actors) are logged
    by harma's `harma.ray` logger as `Ray: ...` warnings, not printed raw by Ray's listener thread;
    retry notices at DEBUG. Ray 2.60's listener calls `ray._private.worker.print_to_stdstream` by
    name for each message (tests/unit/test_console.py holds that)."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "harma_route", False):
        return
    ray_log = logging.getLogger("harma.ray")

    def route(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            original(data, ignore_prefix)
            return
        for message in data.get("lines", []):
            level = logging.DEBUG if RETRY_NOTICE.search(message) else logging.WARNING
            ray_log.log(level, "Ray: %s", message.strip())

    route.harma_route = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = route


# Ray's C++ log line below FATAL: "[2026-12-05 02:43:12,750 E 3342 3342] core_worker.cc:2465: ..."
NATIVE_LOG_LINE = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWE] \d+ \d+\] \S+:\d+: "

# The filter process: stdin -> stdout, line by line, without the lines NATIVE_LOG_LINE matches. A
# partial line is passed on once nothing more comes for 0.1 s (a prompt, a progress bar's "\r").
_GATE = r"""
import os, re, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; EOF ends this
native = re.compile(sys.argv[1].encode())
pending = b""
def write(data):
    while data:
        data = data[os.write(1, data):]
while True:
    ready, _, _ = select.select([0], [], [], 0.1 if pending else None)
    if not ready:
        write(pending)
        pending = b""
        continue
    chunk = os.read(0, 65536)
    if not chunk:
        write(pending)
        break
    *lines, pending = (pending + chunk).split(b"\n")
    write(b"".join(line + b"\n" for line in lines if not native.match(line)))
"""


def is_native_log_line(line: str) -> bool:
    """Whether `line` is one of Ray's C++ log lines below FATAL (what `gate_native_stderr` drops)."""
    return re.match(NATIVE_LOG_LINE, line) is not None


def gate_native_stderr() -> subprocess.Popen | None:
    """This process's stderr (fd 2, where Ray's C++ core writes) through the filter process: Ray's
    C++ log lines below FATAL, which its log files already hold, are dropped; all else passes. For
    `harma`'s process entry points only (not when `harma.cli.main` is called in-process). At exit
    the gate is drained before the process ends, so nothing written to stderr is lost or late."""
    if os.environ.get(RAW_STDERR_VAR) == "1":
        return None
    try:
        read_end, write_end = os.pipe()
        gate = subprocess.Popen([sys.executable, "-I", "-S", "-c", _GATE, NATIVE_LOG_LINE], stdin=read_end, stdout=2, stderr=2)
    except OSError as err:  # no filter: the console shows Ray's lines too, nothing is lost
        log.debug("stderr not filtered: %s", err)
        return None
    os.close(read_end)
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)

    def drain() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)  # the last writer of the pipe in this process: the gate sees EOF
        os.close(devnull)
        try:
            gate.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a child still holds the pipe; the gate ends with it
            pass

    atexit.register(drain)
    return gate


class _QueueHandler(logging.Handler):
    """A worker's log records -> the driver's queue (never blocks, never fails the worker)."""

    def __init__(self, queue: Any):
        super().__init__(logging.INFO)
        self.queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait((record.levelno, record.getMessage()))
        except Exception:  # noqa: BLE001 - a full or gone queue must not stop training
            pass


def attach_relay(queue: Any | None) -> None:
    """In a worker process: send its `harma` log records to the driver's `WorkerLogRelay`."""
    if queue is None:
        return
    root = logging.getLogger("harma")
    if not any(isinstance(h, _QueueHandler) for h in root.handlers):
        root.addHandler(_QueueHandler(queue))
        root.setLevel(logging.INFO)
        root.propagate = False  # Ray's own handlers would write the same lines to its log files only


class WorkerLogRelay:
    """Driver side: a Ray queue the workers log into, drained by a thread that logs each line
    through the driver's `harma.worker` logger."""

    def __init__(self, poll_s: float = 0.2):
        self.poll_s = poll_s
        self.handle: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> WorkerLogRelay:
        from ray.util.queue import Queue

        self.handle = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        self._thread = threading.Thread(target=self._drain, name="harma-worker-logs", daemon=True)
        self._thread.start()
        return self

    def _drain(self) -> None:
        out = logging.getLogger("harma.worker")
        while True:
            try:
                records = self.handle.get_nowait_batch(self.handle.qsize())
            except Exception:  # noqa: BLE001 - the queue actor is gone: nothing more will come
                return
            for level, message in records:
                out.log(level, "%s", message)
            if self._stop.is_set() and not records:
                return
            self._stop.wait(self.poll_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.handle.shutdown()
        except Exception:  # noqa: BLE001
            pass
