"""The shipped Grafana dashboard (docs/grafana/harma-serve.json) charts the metrics the replicas
record (harma.serve.metrics), under the names Ray's exporter gives them, and nothing else."""

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _recorded() -> set[str]:
    """Prometheus names of the metrics ReplicaMetrics creates: ray_ + name (+ _total for counters;
    histograms as _bucket, _count, _sum)."""
    source = (REPO / "platform" / "harma" / "serve" / "metrics.py").read_text()
    names = set()
    for kind, name in re.findall(r"(Counter|Gauge|Histogram)\(\"(harma_[a-z_]+)\"", source):
        if kind == "Counter":
            names.add(f"ray_{name}_total")
        elif kind == "Gauge":
            names.add(f"ray_{name}")
        else:
            names |= {f"ray_{name}_{part}" for part in ("bucket", "count", "sum")}
    return names


def test_every_panel_queries_recorded_metrics_and_every_metric_is_charted():
    dashboard = json.loads((REPO / "docs" / "grafana" / "harma-serve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"ray_harma_[a-z_]+", e)}
    recorded = _recorded()
    assert len(recorded) == 11  # 3 counters, 2 gauges, 2 histograms of 3 series each
    assert used <= recorded, used - recorded
    charted = {re.sub(r"_(bucket|count|sum)$", "", m) for m in used}
    assert charted == {re.sub(r"_(bucket|count|sum)$", "", m) for m in recorded}
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert dashboard["uid"] == "harma-serve"
