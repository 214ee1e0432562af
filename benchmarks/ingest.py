"""Ingest benchmark: (image, caption) pairs/s per CPU core that Ray Data delivers vs a bare loop
doing the same work (decode each image once, resize it once per caption).

    .ci/venv python benchmarks/ingest.py [--images 12000] [--out benchmarks/results/ingest.json] [--smoke]

Both sides decode the same prepared Parquet shards (local object-storage folder) and resize to the
model's input size, as uint8 (the training pipeline ships uint8 and normalises on the device), one
output per caption (5 per image), captions tokenised. Bare: one process, one core, a plain loop. Ray Data: the training
stream's path (harma.data.datasets.image_stream of emit_pairs: a task per shard reads it, emits its
pairs in a uniformly random order, decoding each image at its first pair and keeping it to its
last, PAIRS_PER_CHUNK pairs per output) with a resize in place of the training augmentation, over
every core of a local Ray started as harma starts one; its rate is divided by the cores.
Target: Ray Data per core >= 0.7 x bare. Also printed: the bare loop in one process per core at
once, i.e. what this machine gives when every core decodes (the ceiling for Ray Data's total);
and the stream with an image's captions dealt to 5 tasks (`data.image_visits` 5, what `auto`
picks once a split outgrows the workers' shuffle buffer: one decode per pair, as the paper code's
loader decodes) against a bare loop that also decodes per pair, and against decode-once.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pyarrow.parquet as pq


def bare_rate(files: list[str], size: int, decode_per_pair: bool = False) -> tuple[float, int]:
    """Pairs/s of a plain loop doing the stream's work: each image decoded once (or once per
    caption, as the paper code's loader and the stream's per-caption visits do), resized once per
    caption, its captions tokenised (CLIP BPE, 77 tokens)."""
    from harma.data.tokenizer import ClipTokenizer
    from harma.data.transforms import decode_image, eval_uint8, tokenize

    tokenizer = ClipTokenizer(77)
    t0 = time.perf_counter()
    n = 0
    for f in files:
        table = pq.read_table(f, columns=["image", "captions"])
        for data, captions in zip(table.column("image").to_pylist(), table.column("captions").to_pylist(),
                                  strict=True):
            img = decode_image(data)
            for _ in captions:
                eval_uint8(decode_image(data) if decode_per_pair else img, size)
                n += 1
            tokenize([str(c) for c in captions], tokenizer, 30)
    return n / (time.perf_counter() - t0), n


def bare_rate_all_cores(files: list[str], size: int, cores: int) -> float:
    """The same loop in `cores` processes at once (each over all files): the machine's own scaling."""
    from multiprocessing import get_context

    with get_context("spawn").Pool(cores) as pool:
        t0 = time.perf_counter()
        counts = pool.starmap(bare_rate, [(files, size)] * cores)
        return sum(n for _, n in counts) / (time.perf_counter() - t0)


def resized(img, rng, size: int):
    from harma.data.transforms import eval_uint8

    return eval_uint8(img, size)


def ray_rates(files: list[str], size: int, cores: int, visits: list[int]) -> list[tuple[float, int]]:
    """Pairs/s of the training stream with each of `visits` (`data.image_visits`)."""
    from functools import partial

    import ray
    from harma.data.datasets import emit_pairs, image_stream
    from harma.train.driver import WORKER_LIMIT_VAR, WORKERS_PER_CPU

    os.environ.setdefault(WORKER_LIMIT_VAR, str(WORKERS_PER_CPU * cores))  # as harma.train.driver.ensure_ray
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        rates = []
        for v in visits:
            # The training stream's path and task sizes, with a resize in place of the augmentation.
            ds = image_stream(files, emit_pairs, {"pixels": partial(resized, size=size), "context_length": 77,
                                                  "max_words": 30}, visits=v)
            ds.materialize()  # warm-up: worker processes started and imports done
            t0 = time.perf_counter()
            n = sum(len(b["pixels"]) for b in ds.iter_batches(batch_size=256, batch_format="numpy",
                                                                prefetch_batches=4))
            rates.append((n / (time.perf_counter() - t0), n))
        return rates
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=12000,
                        help="70%% go to the train split (512 per shard): enough shards for steady state")
    parser.add_argument("--size", type=int, default=224, help="output size (224 = ViT-B-32 input)")
    parser.add_argument("--out", default="benchmarks/results/ingest.json")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, tiny sizes (CI runs it so a broken benchmark is a red CI)")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.size = 120, 64
    from harma.data.prepare import prepare_dataset
    from harma.data.synth import synthesize
    from harma.storage import list_files

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(f"{tmp}/raw", args.images, seed=0, image_size=256)
        prepare_dataset(f"{tmp}/raw", f"{tmp}/store", ["train"])  # 512 images per shard
        files = list_files(f"{tmp}/store/train", ".parquet")
        bare, n_bare = bare_rate(files, args.size)
        bare_per_pair, _ = bare_rate(files, args.size, decode_per_pair=True)
        bare_all = bare_rate_all_cores(files, args.size, cores)
        (ray_total, _), (ray_spread, _) = ray_rates(files, args.size, cores, [1, 5])
    per_core, spread_per_core = ray_total / cores, ray_spread / cores
    result = {"pairs": n_bare, "size": args.size, "cores": cores, "bare_pairs_per_s_1core": bare,
              "bare_pairs_per_s_all_cores": bare_all, "ray_data_pairs_per_s": ray_total, "ray_data_pairs_per_s_per_core": per_core,
              "ratio_per_core": per_core / bare, "ratio_all_cores": ray_total / bare_all, "target": 0.7,
              "per_caption_visits": {
                  "image_visits": 5, "bare_decode_per_pair_pairs_per_s_1core": bare_per_pair,
                  "ray_data_pairs_per_s": ray_spread, "ray_data_pairs_per_s_per_core": spread_per_core,
                  "ratio_per_core": spread_per_core / bare_per_pair,
                  "ratio_per_core_against_decode_once": spread_per_core / bare}}
    print(f"{'':<44}{'pairs/s':>12}{'per core':>12}")
    print(f"{'bare PIL (1 core), decode once':<44}{bare:>12.1f}{bare:>12.1f}")
    print(f"{'bare PIL (1 core), decode per pair':<44}{bare_per_pair:>12.1f}{bare_per_pair:>12.1f}")
    print(f"{'bare PIL (' + str(cores) + ' processes), decode once':<44}{bare_all:>12.1f}{bare_all / cores:>12.1f}")
    print(f"{'Ray Data (' + str(cores) + ' cores), 1 visit':<44}{ray_total:>12.1f}{per_core:>12.1f}")
    print(f"{'Ray Data (' + str(cores) + ' cores), 5 visits':<44}{ray_spread:>12.1f}{spread_per_core:>12.1f}")
    print(f"1 visit: ratio per core {per_core / bare:.2f} against bare decode-once on 1 core (target >= 0.7); "
          f"{ray_total / bare_all:.2f} against bare on all {cores} cores")
    print(f"5 visits (image_visits auto once the split outgrows the shuffle buffer): "
          f"{spread_per_core / bare_per_pair:.2f} against bare decode-per-pair, "
          f"{spread_per_core / bare:.2f} against bare decode-once")
    from harma import storage

    storage.write_json(args.out, result)


if __name__ == "__main__":
    main()
