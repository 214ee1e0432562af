"""Run by test_multinode.py in its own process: an elastic run that grows from 1 to 2 workers on 2 nodes.

The simulated cluster starts with one 2-CPU worker node; each Train worker asks for 1.5 CPUs, so
only one fits and the run (workers 1..2) starts on 1 worker. Once its first checkpoint is in
storage, a second node joins; Train's resize monitor (every 3 s here) sees room for a second
worker, restarts the group at 2 workers, and the train function resumes from that checkpoint.
12 epochs: enough for the run to be still going when the resize happens (an epoch takes ~1 s).
"""

import glob
import json
import os
import sys
import threading
import time

from ray.cluster_utils import Cluster

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
        "train.batch_size": 16, "train.epochs": 12, "train.workers.min": 1, "train.workers.max": 2,
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
