"""Place-search benchmark: precision@10 per class query of the HarMA-adapted model against the
frozen base, over generated scenes no training tile came from, scored against the ground-truth
object footprints (harma.geo.evaluate, what `harma eval --geo` prints).

    .ci/venv python benchmarks/place_search.py [--scenes 6] [--scene-size 2048] [--steps 300] \\
        [--out benchmarks/results/place_search.json] [--smoke]

1. a base: harma-tiny pre-trained in full on coarse-caption tiles, as `harma demo` makes it;
2. scenes (`harma data synth --scenes`), their captioned cells prepared as shards with the last
   2 scenes held out (`harma data prepare --scenes --test-scenes 2`);
3. HarMA adapters trained on the other scenes' cells (in-process loop, the demo's adapter
   settings), the best checkpoint on val kept; the frozen base is the same model untrained (its
   adapters start as the identity);
4. both index the held-out scenes (`harma index build`, corpus_format geotiff, local Ray) and
   answer one query per object class; a top-10 tile counts when an object of that class has its
   centre in it. The ceiling: 1.0 for every class with at least 10 tiles holding one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--scene-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=300, help="adaptation steps")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/place_search.json")
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (CI runs it)")
    args = parser.parse_args()
    pretrain_images, pretrain_steps = 1200, 300
    if args.smoke:
        args.scenes, args.scene_size, args.steps, args.k = 3, 512, 4, 3
        pretrain_images, pretrain_steps = 40, 4

    import ray
    from harma import storage
    from harma.config import GeoIndexConfig, IndexConfig
    from harma.data.local import load_split
    from harma.data.prepared import load_prepared_split
    from harma.data.synth import synthesize
    from harma.demo import _pretrain_config, demo_config
    from harma.geo.evaluate import format_scores, place_search_scores, read_truth
    from harma.geo.scenes import synthesize_scenes
    from harma.geo.training import prepare_scenes
    from harma.model.checkpoint import save_backbone_weights, save_checkpoint
    from harma.model.harma import build_model
    from harma.serve.build import build_index
    from harma.serve.encoder import QueryEncoder
    from harma.serve.index import load_index
    from harma.train.local import fit_local

    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_config([f"demo.pretrain_images={pretrain_images}", f"demo.pretrain_steps={pretrain_steps}",
                           "demo.images=20"])
        synthesize(f"{tmp}/tiles", 20, seed=0, pretrain_images=pretrain_images, progress=lambda _: None)
        base = build_model(_pretrain_config(cfg, f"{tmp}/tiles").model, seed=0)
        fit_local(_pretrain_config(cfg, f"{tmp}/tiles"), f"{tmp}/pretrain", model=base,
                  val_split=load_split(f"{tmp}/tiles", "val"), save_best=False)
        save_backbone_weights(f"{tmp}/base.safetensors", base)

        synthesize_scenes(f"{tmp}/scenes", args.scenes, seed=0, size=args.scene_size, progress=lambda _: None)
        report = prepare_scenes(f"{tmp}/scenes", f"{tmp}/store", test_scenes=2, progress=lambda _: None)
        adapt_cfg = cfg.with_overrides({"model.backbone.weights_uri": f"{tmp}/base.safetensors",
                                        "train.steps": args.steps, "train.eval_every": max(1, args.steps // 6),
                                        "train.batch_size": 64 if not args.smoke else 8})
        adapted = fit_local(adapt_cfg, f"{tmp}/adapt", train_split=load_prepared_split(f"{tmp}/store", "train"),
                            val_split=load_prepared_split(f"{tmp}/store", "val"))
        frozen = f"{tmp}/frozen"
        save_checkpoint(frozen, build_model(adapt_cfg.model, seed=adapt_cfg.run.seed), adapt_cfg, {})

        items = json.loads(storage.read_bytes(f"{tmp}/scenes/stac/items.json"))
        items["features"] = [f for f in items["features"] if f["id"] in report["test_scenes"]]
        storage.write_bytes(f"{tmp}/scenes/stac/test.json", json.dumps(items).encode())
        truth = [t for t in read_truth(f"{tmp}/scenes/ground_truth.geojson") if t["scene"] in report["test_scenes"]]
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            for name, ckpt in (("frozen base", frozen), ("HarMA-adapted", adapted.best_checkpoint)):
                out = f"{tmp}/index-{name.split()[0].lower()}"
                build_index(IndexConfig(checkpoint_uri=ckpt, corpus_uri=f"{tmp}/scenes/stac/test.json",
                                        corpus_format="geotiff", output_uri=out, captions=False,
                                        geo=GeoIndexConfig()), progress=lambda _: None)
                index = load_index(out)
                results[name] = place_search_scores(index, QueryEncoder(ckpt, "cpu", trace=False), truth, k=args.k)
                print(f"{name} ({index.size} tiles of {len(report['test_scenes'])} held-out scenes)")
                print(format_scores(results[name]))
        finally:
            ray.shutdown()
        best_val = adapted.best_val
    gain = results["HarMA-adapted"]["mean_precision_at_k"] - results["frozen base"]["mean_precision_at_k"]
    result = {"k": args.k, "scenes": args.scenes, "scene_size": args.scene_size, "test_scenes": report["test_scenes"],
              "train_tiles": report["splits"]["train"]["images"], "adapt_steps": args.steps,
              "adapt_best_val": best_val, "models": results, "mean_precision_gain": gain,
              "seconds": time.perf_counter() - t0, "smoke": args.smoke}
    print(f"mean P@{args.k}: frozen {100 * results['frozen base']['mean_precision_at_k']:.1f}, adapted "
          f"{100 * results['HarMA-adapted']['mean_precision_at_k']:.1f} ({100 * gain:+.1f} points)")
    from harma import storage

    storage.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
