"""What reaches the console besides harma's lines (harma.console): Ray's Python loggers, the errors
the cluster pushes to a driver, and the C++ core's log lines on fd 2. No cluster is started."""

import logging
import subprocess
import sys
import textwrap

import pytest

from harma import console

CPP_ERROR = ("[2026-12-05 02:43:12,750 E 3342 3342] core_worker.cc:2465: Actor with class name: "
             "'MapWorker(MapBatches(ImageEmbedder))' has constructor arguments in the object store")
CPP_FATAL = "[2026-12-05 02:43:13,001 F 3342 3342] core_worker.cc:901: Check failed: a == b"


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, **kwargs)


def test_native_log_line_pattern_takes_ray_cpp_lines_below_fatal_only():
    assert console.is_native_log_line(CPP_ERROR)
    assert console.is_native_log_line("[2026-12-05 02:43:12,750 W 3342 3399] task_manager.cc:12: retrying")
    assert not console.is_native_log_line(CPP_FATAL)
    assert not console.is_native_log_line("02:43:12 [harma] step 8/24 loss 0.41")
    assert not console.is_native_log_line("[harma] E core_worker.cc:1: not Ray's format")


def test_gate_drops_cpp_lines_and_passes_everything_else_in_order():
    proc = run_python(f"""
        import os, sys, time
        from harma.console import gate_native_stderr
        gate_native_stderr()
        os.write(2, b"first\\n" + {CPP_ERROR!r}.encode() + b"\\n")
        print("from python's sys.stderr", file=sys.stderr)
        os.write(2, {CPP_FATAL!r}.encode() + b"\\n")
        os.write(2, b"a partial line without newline")
        time.sleep(0.3)
        os.write(2, b" completed\\n")
    """)
    assert proc.returncode == 0
    assert proc.stderr.splitlines() == ["first", "from python's sys.stderr", CPP_FATAL,
                                        "a partial line without newline completed"]


def test_gate_loses_nothing_when_the_process_aborts():
    """The filter is a separate process: what was written before a hard crash still reaches the console."""
    proc = run_python("""
        import os, sys
        from harma.console import gate_native_stderr
        gate_native_stderr()
        print("Traceback-like last words", file=sys.stderr, flush=True)
        os.abort()
    """)
    assert proc.returncode != 0
    assert "Traceback-like last words" in proc.stderr


def test_gate_can_be_turned_off():
    proc = run_python(f"""
        import os
        from harma.console import gate_native_stderr
        assert gate_native_stderr() is None
        os.write(2, {CPP_ERROR!r}.encode() + b"\\n")
    """, env={**__import__("os").environ, console.RAW_STDERR_VAR: "1"})
    assert proc.stderr.splitlines() == [CPP_ERROR]


def test_ray_loggers_stay_quiet_when_importing_serve_resets_its_logger():
    """`import ray.serve` sets Serve's logger to INFO with its own handler; the filter holds."""
    proc = run_python("""
        import logging
        from harma.console import quiet_ray_loggers
        quiet_ray_loggers()
        import ray.serve
        serve_log = logging.getLogger("ray.serve")
        assert serve_log.level == logging.INFO  # what Serve's import did
        serve_log.info("Started Serve in namespace 'serve'")
        serve_log.warning("a Serve warning")
        logging.getLogger("ray.data").warning("a Ray Data notice")
        logging.getLogger("ray.data").error("a Ray Data error")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "Started Serve" not in proc.stderr
    assert "a Serve warning" in proc.stderr and "a Ray Data error" in proc.stderr
    assert "a Ray Data notice" not in proc.stderr


def test_quieting_twice_keeps_one_filter_at_the_new_level():
    logger = logging.getLogger("ray.tune")
    console.quiet_ray_loggers(logging.ERROR)
    console.quiet_ray_loggers(logging.WARNING)
    thresholds = [f for f in logger.filters if isinstance(f, console._Threshold)]
    assert [t.level for t in thresholds] == [logging.WARNING]


@pytest.fixture
def routed(monkeypatch):
    import ray._private.worker as ray_worker

    passed_on = []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: passed_on.append(data))
    console.route_ray_error_messages()
    return ray_worker, passed_on


def test_errors_pushed_to_the_driver_are_logged_by_harma(routed, caplog):
    ray_worker, passed_on = routed
    caplog.set_level(logging.DEBUG, logger="harma.ray")
    oom = "A worker died or was killed while executing a task by an unexpected system error."
    retry = ("Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task "
             "will be retried. Error: The actor is dead because it was killed by `ray.kill`.")
    ray_worker.print_to_stdstream({"lines": [oom + "\n", retry], "pid": "raylet", "is_err": False}, False)
    ray_worker.print_to_stdstream({"lines": ["a worker's own line"], "pid": 4242, "is_err": False}, False)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, f"Ray: {oom}"), (logging.DEBUG, f"Ray: {retry}")]
    assert passed_on == [{"lines": ["a worker's own line"], "pid": 4242, "is_err": False}]
    console.route_ray_error_messages()  # a second call does not wrap the route again
    assert getattr(ray_worker.print_to_stdstream, "harma_route", False)


def test_rays_error_listener_still_prints_through_the_routed_name():
    """Ray 2.60's listener thread looks up `print_to_stdstream` in its module at each message, which is
    what lets harma route them; a Ray upgrade that binds it differently fails here."""
    import ray._private.worker as ray_worker

    assert "print_to_stdstream" in ray_worker.listen_error_messages.__code__.co_names
