"""Batch-composition benchmark: the share of samples whose global batch holds another caption of
their own image, measured on the training stream, against uniform sampling of (image, caption)
pairs (the paper code's sampler), whose expectation is exact (harma.data.composition).

    .ci/venv python benchmarks/batch_composition.py [--images 3000] [--shard-images 256] \\
        [--batch 16 64] [--epochs 3] [--out benchmarks/results/batch_composition.json] [--smoke]

Generated images (70 % of them in the train split) are prepared into shards of `--shard-images`
and streamed by `harma.data.datasets.build_train_dataset` on a local Ray of 8 logical CPUs (as the
Ray tests run it); batches are drawn as a worker draws them (`iter_batches` with a local shuffle
buffer). Four ways: the former stream (`image_grouped`, buffer of 4 batches), the uniform pair
order with the same small buffer, the uniform pair order with the default
`data.shuffle_buffer_pairs` and one task per image (`data.image_visits: 1`), and the default
(`image_visits: auto`: once the split outgrows the buffer, an image's captions dealt to as many
tasks). The closer to the expectation, the closer to the paper's batches; the
ceiling is the expectation itself.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np


def measure(prepared: str, batch: int, mode: str, buffer: int, epochs: int, visits: int | str) -> float:
    from harma.config import DataConfig
    from harma.data.composition import same_image_share
    from harma.data.datasets import build_train_dataset

    data = DataConfig(prepared_uri=prepared, batch_composition=mode, shuffle_buffer_pairs=buffer, image_visits=visits)
    ds = build_train_dataset(data, 32, 16)
    shares = [same_image_share(b["image_id"]) for _ in range(epochs)
              for b in ds.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True,
                                       local_shuffle_buffer_size=buffer)]
    return float(np.mean(shares))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--shard-images", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/batch_composition.json")
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (CI runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.shard_images, args.batch, args.epochs = 60, 20, [8], 1

    import ray
    from harma.config import DataConfig
    from harma.data.composition import uniform_same_image_share
    from harma.data.datasets import image_visits
    from harma.data.prepare import prepare_dataset
    from harma.data.prepared import captions_per_image
    from harma.data.synth import synthesize

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    buffer = DataConfig().shuffle_buffer_pairs
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            synthesize(f"{tmp}/raw", images=args.images, seed=11, image_size=32)
            prepare_dataset(f"{tmp}/raw", f"{tmp}/store", ["train"], shard_images=args.shard_images)
            counts = captions_per_image(f"{tmp}/store", "train")
            for batch in args.batch:
                row = {"batch": batch, "uniform_expectation": uniform_same_image_share(counts, batch)}
                for name, mode, buf, visits in (("image_grouped", "image_grouped", 4 * batch, 1),
                                                ("uniform_small_buffer", "uniform", 4 * batch, 1),
                                                ("uniform_one_visit", "uniform", buffer, 1),
                                                ("uniform", "uniform", buffer, "auto")):
                    row[name] = measure(f"{tmp}/store", batch, mode, buf, args.epochs, visits)
                row["image_visits"] = image_visits(counts, buffer)
                rows.append(row)
    finally:
        ray.shutdown()
    print(f"{len(counts)} train images, shards of {args.shard_images}, {args.epochs} epoch(s); share of samples "
          "with a same-image caption in their batch")
    print(f"{'batch':>6}{'uniform sampling':>18}{'image_grouped':>15}{'uniform, 4-batch buffer':>25}"
          f"{f'{buffer} buffer, 1 visit':>22}{f'{buffer} buffer, auto visits':>28}")
    for r in rows:
        print(f"{r['batch']:>6}{r['uniform_expectation']:>18.3f}{r['image_grouped']:>15.3f}"
              f"{r['uniform_small_buffer']:>25.3f}{r['uniform_one_visit']:>22.3f}"
              f"{r['uniform']:>20.3f} ({r['image_visits']})")
    result = {"train_images": len(counts), "shard_images": args.shard_images, "epochs": args.epochs,
              "shuffle_buffer_pairs": buffer, "rows": rows, "smoke": args.smoke}
    from harma import storage

    storage.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
