"""`harma demo`: the whole method end to end on a generated aerial dataset, on this machine.

    harma demo [--out harma-demo] [--config jobs/demo.yaml] [overrides]

1. generates a small dataset (a pre-training split with coarse captions, and downstream
   train/val/test splits with detailed captions) in a local folder, and prepares it as Parquet
   shards in a local object-storage folder (`<out>/store`);
2. pre-trains the tiny backbone in full on the pre-training split, in this process (no weights can
   be downloaded, so this stands in for a pretrained CLIP) and saves it as `base.safetensors`;
3. HarMA-adapts the frozen base through the product path, `harma.train.fit`: Ray Data streams the
   shards into 2 Ray Train workers running the DeepSpeed-wrapped model (gloo, fp32 on CPU),
   validating every epoch and keeping the best checkpoint on val;
4. evaluates the frozen base and the adapted model on test, prints the table and writes
   `report/metrics.json` and `report/training.png` (loss and val mR over training);
5. copies the best checkpoint to `<out>/model`, builds the retrieval index of the test images
   with Ray Data (`<out>/index`), starts the Ray Serve application on it, sends a few text
   queries over HTTP, prints their top results and the address of the web page (kept running
   with `--serve`; `harma serve serve_configs/demo.yaml` serves it again later);
6. generates a few georeferenced COG scenes with a STAC ItemCollection (`<out>/scenes`), tiles
   and indexes them with their footprints (`<out>/scene-index`), serves that index and asks two
   place-and-time queries, printing each hit's coordinates.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from harma import storage
from harma.config import PlatformConfig, load_config
from harma.data.local import eval_arrays, load_split
from harma.data.prepare import prepare_dataset
from harma.data.synth import synthesize
from harma.eval import format_table
from harma.model.backbone import build_tokenizer
from harma.model.checkpoint import load_checkpoint, save_backbone_weights
from harma.model.harma import build_model, parameter_summary
from harma.train.driver import fit
from harma.train.evaluate import evaluate_arrays
from harma.train.local import fit_local

log = logging.getLogger(__name__)

# The demo's settings on top of the schema defaults; jobs/demo.yaml holds the same (tested).
DEMO_OVERRIDES: dict[str, Any] = {
    "run.name": "demo",
    "run.seed": 0,
    "model.backbone.arch": "harma-tiny",
    "model.adapter.rank": 32,
    "model.adapter.heads": 4,
    "model.adapter.mini_rank": 16,
    "model.adapter.mini_heads": 4,
    "data.augment.hflip": False,
    "train.steps": 600,
    "train.batch_size": 128,
    "train.optimizer.lr": 5e-3,
    "train.loss.triplet_reduction": "mean",
    "train.eval_every": 100,
    "train.log_every": 25,
    "train.workers.min": 2,
    "train.workers.max": 2,
    "demo.images": 1000,
}


def demo_config(overrides: list[str] | None = None, path: str | None = None) -> PlatformConfig:
    """The demo's config: `path` if given, else the built-in demo settings; then overrides."""
    if path:
        return load_config(path, overrides)
    return PlatformConfig().with_overrides(DEMO_OVERRIDES).with_overrides(overrides or [])


def _pretrain_config(cfg: PlatformConfig, data_root: str) -> PlatformConfig:
    return cfg.with_overrides({
        "run.name": f"{cfg.run.name}-pretrain",
        "model.adapter.kind": "none",
        "model.train_backbone": True,
        "model.backbone.weights_uri": None,
        "data.root": data_root,
        "data.train_split": "pretrain",
        "train.steps": cfg.demo.pretrain_steps,
        "train.batch_size": cfg.demo.pretrain_batch_size,
        "train.optimizer.lr": cfg.demo.pretrain_lr,
        "train.loss": cfg.demo.pretrain_loss.model_dump(),
        "train.eval_every": max(1, cfg.demo.pretrain_steps),
    })


DEMO_QUERIES = (
    "three red storage tanks in the center on desert",
    "a river next to farmland with a road",
    "planes on a grassland in the top left",
)


def _free_port(preferred: int) -> int:
    import socket

    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return sock.getsockname()[1]
            except OSError:
                continue
    raise OSError("no free TCP port")


def serve_demo(checkpoint: str, store: str, out: str, port: int, keep_serving: bool) -> dict[str, Any]:
    """Index the test images, serve them, query over HTTP; returns what was asked and found."""
    import ray.serve
    import requests

    import ray
    from harma.config import IndexConfig
    from harma.model.checkpoint import copy_checkpoint
    from harma.serve.app import build_app
    from harma.serve.build import build_index

    model_uri, index_uri = storage.join(out, "model"), storage.join(out, "index")
    copy_checkpoint(checkpoint, model_uri)
    manifest = build_index(IndexConfig(checkpoint_uri=model_uri, corpus_uri=store, splits=["test"],
                                       output_uri=index_uri), progress=log.info)
    port = _free_port(port)
    ray.serve.start(http_options={"host": "127.0.0.1", "port": port})
    ray.serve.run(build_app({"checkpoint_uri": storage.absolute(model_uri),
                             "index_uri": storage.absolute(index_uri)}), name="harma", route_prefix="/")
    url = f"http://127.0.0.1:{port}/"
    answers = []
    captions = _captions_by_image(store)
    for text in DEMO_QUERIES:
        response = requests.post(url + "v1/text-to-images", json={"text": text, "k": 3}, timeout=60)
        response.raise_for_status()
        body = response.json()
        answers.append({"text": text, "took_ms": body["took_ms"], "results": body["results"]})
        log.info("query %r (%.1f ms):", text, body["took_ms"])
        for hit in body["results"]:
            log.info("   %.3f  %s  \"%s\"", hit["score"], hit["id"], captions.get(hit["id"], "?"))
    scenes = scene_demo(model_uri, out, url) if DEMO_SCENES else None
    if scenes is not None:  # the tile index again, for the page
        ray.serve.run(build_app({"checkpoint_uri": storage.absolute(model_uri),
                                 "index_uri": storage.absolute(index_uri)}), name="harma", route_prefix="/")
    log.info("web page: %s   (API docs: %sdocs)", url, url)
    if keep_serving:
        import time as _time

        log.info("serving until Ctrl-C (harma serve serve_configs/demo.yaml serves it again later)")
        try:
            while True:
                _time.sleep(3600)
        except KeyboardInterrupt:
            pass
    ray.serve.shutdown()
    return {"index": index_uri, "model": model_uri, "images": manifest["images"], "url": url,
            "queries": answers, "scenes": scenes}


DEMO_SCENES = 3  # generated scenes of the scene step, 1024 px a side (7 x 7 tiles each)
SCENE_QUERIES = (  # (text, scene whose western half is searched, STAC interval)
    ("storage tanks next to a river", 0, "2025-01-01/2025-02-28"),
    ("ships at sea", 1, "2025-03-01/.."),
)


def scene_demo(model_uri: str, out: str, url: str) -> dict[str, Any]:
    """Step 6: scenes generated, tiled and indexed with footprints, served, asked by place and time."""
    import ray.serve
    import requests
    from shapely.geometry import shape

    from harma.config import GeoIndexConfig, IndexConfig
    from harma.geo.scenes import synthesize_scenes
    from harma.serve.app import build_app
    from harma.serve.build import build_index

    root, index_uri = storage.join(out, "scenes"), storage.join(out, "scene-index")
    log.info("[6/6] %d georeferenced scenes (COG + STAC) in %s, tiled and indexed with footprints",
             DEMO_SCENES, root)
    synthesize_scenes(root, DEMO_SCENES, seed=0, size=1024, progress=log.info)
    stac = storage.join(root, "stac", "items.json")
    manifest = build_index(IndexConfig(checkpoint_uri=model_uri, corpus_uri=stac, corpus_format="geotiff",
                                       output_uri=index_uri, captions=False, geo=GeoIndexConfig()), progress=log.info)
    ray.serve.run(build_app({"checkpoint_uri": storage.absolute(model_uri), "index_uri": storage.absolute(index_uri)}),
                  name="harma", route_prefix="/")
    items = json.loads(storage.read_bytes(stac))["features"]
    answers = []
    for text, scene, interval in SCENE_QUERIES:
        w, s, e, n = shape(items[scene]["geometry"]).bounds
        bbox = [round(w, 5), round(s, 5), round((w + e) / 2, 5), round(n, 5)]
        response = requests.post(url + "v1/text-to-images", json={"text": text, "k": 3, "bbox": bbox, "datetime": interval},
                                 headers={"Accept": "application/geo+json"}, timeout=60)
        response.raise_for_status()
        features = response.json()["features"]
        log.info("place query %r in bbox %s, %s: %d hit(s)", text, bbox, interval, len(features))
        for f in features:
            p = f["properties"]
            log.info("   %.3f  %s  centre %.5f, %.5f  acquired %s", p["score"], f["id"], p["centre"][0],
                     p["centre"][1], p["metadata"]["datetime"])
        answers.append({"text": text, "bbox": bbox, "datetime": interval, "features": features})
    return {"index": index_uri, "tiles": manifest["images"], "scenes": manifest["geo"]["scenes"], "queries": answers}


def _captions_by_image(store: str) -> dict[str, str]:
    """First caption of every prepared test image (to print next to a hit)."""
    from harma.data.prepared import split_files

    first = {}
    for uri in split_files(store, "test"):
        table = storage.read_table(uri, columns=["image_key", "captions"])
        for row in table.to_pylist():
            first[row["image_key"]] = row["captions"][0]
    return first


def run_demo(cfg: PlatformConfig, out: str, port: int = 8000, keep_serving: bool = False) -> dict[str, Any]:
    """Run the demo into folder `out`; returns the report (also written to out/report)."""
    t_start = time.perf_counter()
    data_root = storage.join(out, "data")
    report_dir = storage.join(out, "report")

    log.info("[1/6] generating the dataset in %s and preparing Parquet shards", data_root)
    manifest = synthesize(data_root, cfg.demo.images, seed=cfg.run.seed,
                          pretrain_images=cfg.demo.pretrain_images, progress=log.info)
    store = storage.join(out, "store", "synth")
    prepare_dataset(data_root, store, ["train", "val", "test"], progress=log.info)

    log.info("[2/6] pre-training the %s backbone in full on %d coarse-caption images (%d steps)",
             cfg.model.backbone.arch, cfg.demo.pretrain_images, cfg.demo.pretrain_steps)
    pre_cfg = _pretrain_config(cfg, data_root)
    base = build_model(pre_cfg.model, seed=cfg.run.seed)
    val_split = load_split(data_root, cfg.data.val_split)
    pre = fit_local(pre_cfg, storage.join(out, "pretrain"), model=base, val_split=val_split,
                    save_best=False)
    base_uri = storage.join(out, "base.safetensors")
    save_backbone_weights(base_uri, base)

    adapt_cfg = cfg.with_overrides({"model.backbone.weights_uri": base_uri, "data.root": data_root,
                                    "data.prepared_uri": store,
                                    "run.output_dir": storage.join(out, "runs")})
    model = build_model(adapt_cfg.model, seed=adapt_cfg.run.seed)
    summary = parameter_summary(model)
    test_split = load_split(data_root, cfg.data.test_split)
    tokenizer = build_tokenizer(model.arch.name)
    test_images, test_tokens = eval_arrays(test_split, model.arch.image_size, tokenizer, cfg.data.max_words)
    before = evaluate_arrays(model, test_images, test_tokens, test_split.caption_image)
    log.info("[3/6] HarMA-adapting the frozen base on %d Ray Train worker(s) under DeepSpeed: %d "
             "trainable of %d parameters (%s layout)", adapt_cfg.train.workers.max,
             summary["trainable_params"], summary["total_params"], adapt_cfg.model.adapter.layout)
    adapt = fit(adapt_cfg)

    log.info("[4/6] evaluating on test (best checkpoint on val: step %d, val mR %.2f)",
             adapt.best_step, adapt.best_val["mr"])
    best_model, _ = load_checkpoint(adapt.best_checkpoint)
    after = evaluate_arrays(best_model, test_images, test_tokens, test_split.caption_image)
    history = [json.loads(line) for line in storage.read_bytes(
        storage.join(adapt.report_dir, "history.jsonl")).decode().splitlines()]
    log.info("[5/6] indexing the test images, serving them with Ray Serve, querying over HTTP")
    served = serve_demo(adapt.best_checkpoint, store, out, port, keep_serving)
    seconds = time.perf_counter() - t_start
    report = {
        "serving": served,
        "dataset": manifest,
        "parameters": summary,
        "test_before": before,
        "test_after": after,
        "mr_gain": after["mr"] - before["mr"],
        "best_val": adapt.best_val,
        "best_step": adapt.best_step,
        "checkpoint": adapt.best_checkpoint,
        "run_dir": adapt.run_dir,
        "workers": adapt.world_size,
        "train_seconds": adapt.seconds,
        "base_weights": base_uri,
        "wall_seconds": seconds,
        "pretrain_history": pre.history,
        "adapt_history": history,
        "config": adapt_cfg.to_dict(),
    }
    storage.write_bytes(storage.join(report_dir, "metrics.json"), json.dumps(report, indent=1).encode())
    plot_training(report, storage.join(report_dir, "training.png"))
    table = format_table({"frozen base": before, "HarMA-adapted": after})
    storage.write_bytes(storage.join(report_dir, "table.txt"), (table + "\n").encode())
    return report


def plot_training(report: dict[str, Any], uri: str) -> None:
    """PNG: training loss of both stages, and val mR over adaptation steps."""
    from harma.plots import new_figure, png_bytes

    fig, axes = new_figure(1, 2, (11, 4))
    for name, key in (("pre-training (full)", "pretrain_history"), ("HarMA adaptation", "adapt_history")):
        rows = [r for r in report[key] if "loss" in r]
        axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].set_yscale("log")
    axes[0].legend()
    rows = [r for r in report["adapt_history"] if "val_mr" in r]
    axes[1].plot([r["step"] for r in rows], [r["val_mr"] for r in rows], marker="o", label="val mR")
    axes[1].axhline(report["test_before"]["mr"], color="grey", linestyle="--", label="test mR, frozen base")
    axes[1].axhline(report["test_after"]["mr"], color="green", linestyle="--", label="test mR, adapted")
    axes[1].set_xlabel("adaptation step")
    axes[1].set_ylabel("mR (%)")
    axes[1].legend()
    fig.suptitle("HarMA demo on the generated aerial dataset")
    storage.write_bytes(uri, png_bytes(fig))
