"""Run by test_multinode.py in its own process: an elastic run that grows from 1 to 2 workers on 2 nodes.

The simulated cluster starts with one 2-CPU worker node; each Train worker asks for 1.5 CPUs, so
only one fits and the run (workers 1..2) starts on 1 worker. Once its first checkpoint is in
storage, a second node joins; Train's resize monitor (every 3 s here) sees room for a second
worker, restarts the group at 2 workers, and the train function resumes from that checkpoint.

Train learns of the new node from Ray Data's AutoscalingCoordinator, whose view of the cluster is
refreshed every 20 s (TICK_INTERVAL_S, Ray 2.60); a real cluster waits that long, but a short run at
~1.5-3 s an epoch can end first (seen in CI: a 12-epoch run grew after its last step). So the scenario
asks the coordinator for a fresh view once the node is up, as its next tick would, and 8 epochs leave
the two workers most of the run.
"""

import glob
import json
import os
import sys
import threading
import time

from ray.cluster_utils import Cluster
from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
    get_or_create_autoscaling_coordinator,
)

import ray
from harma.config import ModelConfig, PlatformConfig
from harma.train.driver import fit

prepared, out = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
first_node = cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
outcome: dict = {}


def run() -> None:
    model = ModelConfig.model_validate({"backbone": {"arch": "harma-tiny"},
                                        "adapter": {"rank": 16, "heads": 4, "mini_rank": 8, "mini_heads": 4}})
    cfg = PlatformConfig(model=model).with_overrides({
        "run.name": "grows", "run.output_dir": out, "data.prepared_uri": prepared,
        "train.batch_size": 16, "train.epochs": 8, "train.workers.min": 1, "train.workers.max": 2,
        "train.workers.cpus_per_worker": 1.5, "train.workers.resize_interval_s": 3,
        "train.workers.max_failures": 3, "train.log_every": 4})
    try:
        outcome["result"] = fit(cfg, evaluate_test=False)
    except BaseException as err:  # reported by the main thread
        outcome["error"] = repr(err)


def checkpoints() -> list[str]:
    return glob.glob(os.path.join(out, "grows", "checkpoint_*"))


try:
    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 240
    while not checkpoints() and worker.is_alive():
        if time.monotonic() > deadline:
            raise TimeoutError("no checkpoint within 240 s")
        time.sleep(0.5)
    checkpoints_before = len(checkpoints())
    second_node = cluster.add_node(num_cpus=2)
    # the coordinator's tick, now rather than up to 20 s later (the requester id is any: only the tick counts)
    ray.get(get_or_create_autoscaling_coordinator().get_reserved_resources.remote("elastic_run", recompute=True))
    print(f"ADDED node after {checkpoints_before} checkpoint(s)", flush=True)
    worker.join(timeout=300)
    if "error" in outcome or "result" not in outcome:
        raise SystemExit(f"fit failed: {outcome.get('error', 'did not finish in time')}")
    result = outcome["result"]
    print("RESULT " + json.dumps({
        "steps": result.steps, "world_size": result.world_size, "nodes": result.nodes,
        "restarts": result.restarts, "checkpoints_before": checkpoints_before,
        "node_ids": [first_node.node_id, second_node.node_id]}), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
