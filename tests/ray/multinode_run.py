"""Run by test_multinode.py in its own process: a 2-node cluster simulated on this machine.

Each worker node has 2 CPUs and each Train worker asks for 1.5, so the two workers must land on
different nodes; the head has 1 CPU and takes none.
"""

import json
import sys

from ray.cluster_utils import Cluster

import ray
from harma.config import ModelConfig, PlatformConfig
from harma.train.driver import fit

prepared, out = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
worker_nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
try:
    model = ModelConfig.model_validate({"backbone": {"arch": "harma-tiny"},
                                        "adapter": {"rank": 16, "heads": 4, "mini_rank": 8, "mini_heads": 4}})
    cfg = PlatformConfig(model=model).with_overrides({
        "run.name": "two-nodes", "run.output_dir": out, "data.prepared_uri": prepared,
        "train.batch_size": 16, "train.epochs": 1, "train.workers.min": 2, "train.workers.max": 2,
        "train.workers.cpus_per_worker": 1.5, "train.log_every": 4})
    result = fit(cfg)
    print("RESULT " + json.dumps({"nodes": result.nodes, "steps": result.steps,
                                  "worker_nodes": [n.node_id for n in worker_nodes]}))
finally:
    ray.shutdown()
    cluster.shutdown()
