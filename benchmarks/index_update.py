"""`harma index add` of 10% new images against a full rebuild of the same index.

    .ci/venv python benchmarks/index_update.py [--arch ViT-B-32] [--images 2000] [--new 0.1] \\
        [--vectors 200000] [--out benchmarks/results/index_update.json] [--smoke]

Same run, same local Ray, same checkpoint (random weights: embedding cost does not depend on
them), an image-folder corpus of `--images` generated JPEGs of the model's size:
* rebuild: `harma index build` (build_index) of the whole corpus;
* delete: `delete_from_index` of the newest `new` share of the rebuilt index (no model, no Ray),
  which leaves the index as it was before those files arrived (the same vectors);
* add: `add_to_index` of that version from the corpus, which embeds only the files it lacks; its
  time against the rebuild's (target <= 0.15; the ceiling is `new`: embedding cost in proportion
  to the items, nothing fixed, where a model's load and the pipeline's start are fixed costs);
* the FAISS part at scale, no model: `--vectors` clustered 512-d vectors in IVF-PQ, adding 10%
  to the trained index (harma.index.update.added_ann) against training and filling it again.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_corpus(folder: Path, images: int, size: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        base = rng.integers(0, 255, size=(size // 8, size // 8, 3), dtype=np.uint8)  # blocky, JPEG-sized
        Image.fromarray(base).resize((size, size)).save(folder / f"tile_{i:06d}.jpg", quality=90)


def make_checkpoint(root: Path, arch: str) -> str:
    from harma.config import PlatformConfig
    from harma.model.checkpoint import save_checkpoint
    from harma.model.harma import build_model

    overrides = {"model.backbone.arch": arch}
    if arch == "harma-tiny":
        overrides.update({"model.adapter.rank": 32, "model.adapter.heads": 4,
                          "model.adapter.mini_rank": 16, "model.adapter.mini_heads": 4})
    cfg = PlatformConfig().with_overrides(overrides)
    ckpt = str(root / "ckpt")
    save_checkpoint(ckpt, build_model(cfg.model, seed=0), cfg, {})
    return ckpt


def faiss_part(vectors: int, dim: int, share: float) -> dict:
    """IVF-PQ: append `share` new vectors to the trained index vs train + fill over all of them."""
    from harma.index.ann import build_ann, plan_ann
    from harma.index.synthetic import clip_like_vectors
    from harma.index.update import added_ann

    data, _ = clip_like_vectors(vectors, dim, seed=0)
    old = int(vectors * (1 - share))
    params = plan_ann("ivf_pq", vectors, dim, 8 << 30)
    t = time.perf_counter()
    build_ann(data, params)
    rebuild_s = time.perf_counter() - t
    parent = build_ann(data[:old], params)
    t = time.perf_counter()
    added_ann(parent, data[old:])
    add_s = time.perf_counter() - t
    return {"vectors": vectors, "dim": dim, "new": vectors - old, "rebuild_s": rebuild_s, "add_s": add_s,
            "ratio": add_s / rebuild_s, "nlist": params.nlist, "pq_m": params.pq_m}


def main() -> None:
    sys.path.insert(0, str(REPO / "platform"))
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--new", type=float, default=0.1, help="share of the corpus that is new")
    parser.add_argument("--vectors", type=int, default=200_000, help="FAISS part (0: skip)")
    parser.add_argument("--out", default="benchmarks/results/index_update.json")
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (CI runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.arch, args.images, args.vectors = "harma-tiny", 40, 20_000

    import ray
    from harma import storage
    from harma.config import IndexConfig
    from harma.index.update import add_to_index, delete_from_index
    from harma.index.versions import version_uri
    from harma.model.backbone import arch_info
    from harma.serve.build import build_index

    quiet = lambda _: None  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="harma-index-update-") as tmp:
        root = Path(tmp)
        size = arch_info(args.arch).image_size
        t = time.perf_counter()
        make_corpus(root / "corpus", args.images, size)
        ckpt = make_checkpoint(root, args.arch)
        print(f"{args.images} JPEGs of {size} px and a {args.arch} checkpoint ({time.perf_counter() - t:.0f} s)",
              flush=True)
        cores = os.cpu_count() or 1
        ray.init(num_cpus=cores + 2, include_dashboard=False, log_to_driver=False)
        common = {"checkpoint_uri": ckpt, "corpus_format": "images", "batch_size": 32, "actors": 1,
                  "cpus_per_actor": float(cores), "thumbnail_size": 64, "ann": "exact"}
        t = time.perf_counter()
        build_index(IndexConfig(corpus_uri=str(root / "corpus"), output_uri=str(root / "rebuilt"), **common), quiet)
        rebuild_s = time.perf_counter() - t
        print(f"  rebuild of {args.images}: {rebuild_s:.1f} s", flush=True)
        old = int(args.images * (1 - args.new))
        rebuilt = str(root / "rebuilt")
        gone = sorted(p.name for p in (root / "corpus").iterdir())[old:]
        t = time.perf_counter()  # the index lacking the newest share: the rebuilt one without it
        delete_from_index(rebuilt, gone, progress=quiet)
        delete_s = time.perf_counter() - t
        settings = {"actors": 1, "cpus_per_actor": float(cores), "batch_size": 32}
        t = time.perf_counter()
        added = add_to_index(version_uri(rebuilt, 2), settings, quiet)
        add_s = time.perf_counter() - t
        print(f"  add of {added['change']['added']}: {add_s:.1f} s", flush=True)
        ray.shutdown()
    new = args.images - old
    faiss_row = faiss_part(args.vectors, 512 if not args.smoke else 64, args.new) if args.vectors else None
    result = {"arch": args.arch, "images": args.images, "new": new, "rebuild_s": rebuild_s, "add_s": add_s,
              "add_ratio": add_s / rebuild_s, "ceiling_ratio": new / args.images, "target_ratio": 0.15,
              "meets_target": add_s / rebuild_s <= 0.15, "delete_s": delete_s, "delete_ratio": delete_s / rebuild_s,
              "added_embedded": added["change"]["added"], "faiss_ivf_pq": faiss_row, "smoke": args.smoke}
    print(f"\n{'operation':34} {'seconds':>8} {'x rebuild':>10}")
    print(f"{'rebuild ' + str(args.images) + ' images (' + args.arch + ')':34} {rebuild_s:8.1f} {1:10.3f}")
    print(f"{'add ' + str(new) + ' new (embeds only those)':34} {add_s:8.1f} {add_s / rebuild_s:10.3f}"
          f"   target <= 0.15: {'met' if result['meets_target'] else 'NOT met'}; ceiling {new / args.images:.3f}")
    print(f"{'delete ' + str(new) + ' (no model)':34} {delete_s:8.2f} {delete_s / rebuild_s:10.4f}")
    if faiss_row:
        print(f"{'IVF-PQ ' + str(faiss_row['vectors']) + ': train + fill':34} {faiss_row['rebuild_s']:8.1f} {1:10.3f}")
        print(f"{'IVF-PQ: append ' + str(faiss_row['new']):34} {faiss_row['add_s']:8.2f} {faiss_row['ratio']:10.3f}")
    storage.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
