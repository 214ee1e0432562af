"""A closed-loop HTTP load generator for the search service, run as its own process.

    python -m harma.serve.loadtest --url http://127.0.0.1:8000 --seconds 30 --concurrency 16 \\
        [--bulk N] [--api-key KEY] [--out load.json]

`concurrency` clients each send text queries back to back for `seconds` (bounded in time: a
request still open at the end is cancelled and counted as unfinished, not failed); with `--bulk N`
each request carries N queries to /v1/text-to-images/batch. Prints and writes: requests, failures
(non-200 or connection errors, with their first messages), queries/s, latency percentiles (per
request), the start time (unix) and per-second counts (for lining up with replica scaling or a killed replica).
SIGUSR1 ends the load early (each client finishes its request in flight), for a caller whose
scenario is over before `seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import time
from typing import Any

import numpy as np

QUERIES = (
    "three storage tanks next to a river", "a red building on farmland", "planes in the top left",
    "two ships on the sea near a road", "a large pond in a forest", "green fields with a road",
    "many trees in an urban area", "a small white tank on desert in the center",
)


def percentiles(latencies_ms: list[float]) -> dict[str, float]:
    if not latencies_ms:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "max": float("nan")}
    arr = np.asarray(latencies_ms)
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}


async def _client(session, url: str, headers: dict, deadline: float, k: int, rng: random.Random,
                  records: list[dict[str, Any]], bulk: int = 0, stop: asyncio.Event | None = None) -> None:
    import aiohttp

    while time.perf_counter() < deadline and not (stop and stop.is_set()):
        if bulk:
            body: dict[str, Any] = {"queries": [{"text": rng.choice(QUERIES), "k": k} for _ in range(bulk)]}
        else:
            body = {"text": rng.choice(QUERIES), "k": k}
        start = time.perf_counter()
        record: dict[str, Any] = {"t": start, "queries": bulk or 1}
        try:
            async with session.post(url, json=body, headers=headers) as response:
                payload = await response.read()
                record["status"] = response.status
                if response.status != 200:
                    record["error"] = payload[:200].decode(errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as err:
            record["status"] = 0
            record["error"] = f"{type(err).__name__}: {err}"
        record["ms"] = (time.perf_counter() - start) * 1000
        records.append(record)


async def run_load(base_url: str, seconds: float, concurrency: int, k: int = 10,
                   api_key: str | None = None, seed: int = 0, bulk: int = 0) -> dict[str, Any]:
    """Run the load; returns the summary (see the module docstring)."""
    import aiohttp

    url = base_url.rstrip("/") + ("/v1/text-to-images/batch" if bulk else "/v1/text-to-images")
    headers = {"X-API-Key": api_key} if api_key else {}
    records: list[dict[str, Any]] = []
    started_unix = time.time()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    timeout = aiohttp.ClientTimeout(total=max(30.0, seconds))
    connector = aiohttp.TCPConnector(limit=concurrency)
    stop = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not in the main thread
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stop.set)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = [asyncio.create_task(_client(session, url, headers, deadline, k, random.Random(seed + i), records,
                                             bulk, stop))
                 for i in range(concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=seconds + 30)
        for task in pending:
            task.cancel()
    wall = time.perf_counter() - t0
    ok = [r for r in records if r["status"] == 200]
    failed = [r for r in records if r["status"] != 200]
    per_second: dict[int, dict[str, int]] = {}
    for r in records:
        slot = per_second.setdefault(int(r["t"] - t0), {"ok": 0, "failed": 0})
        slot["ok" if r["status"] == 200 else "failed"] += 1
    return {
        "url": url, "started_unix": started_unix, "seconds": round(wall, 2), "concurrency": concurrency,
        "bulk": bulk, "requests": len(records), "ok": len(ok), "failed": len(failed),
        "unfinished": len(pending), "qps": sum(r["queries"] for r in ok) / wall if wall else 0.0,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "latency_ms": percentiles([r["ms"] for r in ok]),
        "errors": sorted({r.get("error", "")[:160] for r in failed})[:10],
        "failures": [[round(r["t"] - t0, 2), r.get("error", "")[:80]] for r in failed][:100],  # [start s, error]
        "per_second": [per_second.get(s, {"ok": 0, "failed": 0}) for s in range(int(wall) + 1)],
    }


def format_summary(summary: dict[str, Any]) -> str:
    lat = summary["latency_ms"]
    per = f" of {summary['bulk']} queries" if summary.get("bulk") else ""
    return (f"{summary['requests']} requests{per} in {summary['seconds']:.1f} s at concurrency "
            f"{summary['concurrency']}: {summary['ok']} ok, {summary['failed']} failed, "
            f"{summary['qps']:.1f} q/s; latency p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, "
            f"p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harma.serve.loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="base URL of the service")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--bulk", type=int, default=0,
                        help="queries per request, sent to /v1/text-to-images/batch (0: one per request)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--out", default=None, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    summary = asyncio.run(run_load(args.url, args.seconds, args.concurrency, args.k, args.api_key, bulk=args.bulk))
    print(format_summary(summary), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(summary, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
