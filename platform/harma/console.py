"""What the console shows: harma's own progress and errors; Ray's internals stay in Ray's log files.

    ensure_ray()                          # harma.train.driver: log_to_driver off, Ray's loggers quiet
    with WorkerLogRelay() as relay:       # the driver: prints the workers' harma lines as they come
        TorchTrainer(..., train_loop_config={..., "console": relay.handle})
    attach_relay(loop_config["console"])  # in a worker: its `harma` log records go to the driver

Ray forwards every worker's stdout and stderr to the driver (`log_to_driver`), which put hundreds of
Ray Train, Ray Data, controller and raylet lines, with ANSI prefixes, between harma's own progress
lines. harma starts Ray without that forwarding and sends its workers' `harma.*` log records (rank
0's progress, every rank's warnings) through a Ray queue to the driver, which logs them as its own.
Ray's log folder is printed once when harma starts a cluster.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


def quiet_ray_loggers(level: int = logging.WARNING) -> None:
    """Ray's own Python loggers in this process at `level` (their INFO lines: Ray's log files);
    Ray Data's at ERROR (its warnings here are notices such as 'Progress bars disabled')."""
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.ERROR) if name == "ray.data" else level)


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
