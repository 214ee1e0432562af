"""Paper-table benchmark: frozen base vs HarMA vs full fine-tuning, same split, same step budget.

    .ci/venv python benchmarks/paper_table.py [--smoke] [--steps 600] [--harma-lr 5e-3] \\
        [--full-lr 5e-4] [--tolerance 1.0] [--out benchmarks/results/paper_table.json]

As the demo does (`harma.demo`): generates one aerial dataset (a pre-training split with coarse
captions, train/val/test with detailed ones) and pre-trains the tiny backbone in full on the
pre-training split (the stand-in for a pretrained CLIP, saved as `base.safetensors`). Then, on that
same base, the same train/val/test split, the same step budget, batch, seed (same data order) and
the same in-process loop (`harma.train.local.fit_local`: best checkpoint on val, scored on test):

* frozen base: no training, its test recalls;
* HarMA: the demo's adapters (official layout), backbone frozen, at `--harma-lr`;
* full fine-tuning: `model.train_backbone: true`, `model.adapter.kind: none`, every backbone
  weight trains, at `--full-lr`.

Each variant (and the pre-training) runs in a fresh process, forked from a multiprocessing fork
server that has only imported torch, open_clip and harma's local loop (each process skips the ~5 s
import, and nothing of one variant reaches another), so its peak RSS is its own. Printed: trainable
parameters (and their share of the model), test R@1/5/10 both ways and mR, training wall time (the
`fit_local` call: steps, validations, checkpoints) and CPU time (all threads: less dependent on
what else the machine runs; the load average is kept too), the peak RSS up to the end of
training, beside the RSS before training (data and model loaded). `fit_local` trains on the CPU,
so no CUDA peak applies (`cuda_peak_bytes` is null).

The two trained variants each use their own peak lr (warm-up + linear decay as configured): HarMA
`--harma-lr` 5e-3, the demo's adaptation lr; full fine-tuning `--full-lr` 5e-4, half the lr the
base itself was pre-trained with in full (`demo.pretrain_lr` 1e-3): a whole backbone takes a lower
lr than fresh adapters. Neither is tuned here; pass others to see how the verdict moves. The
verdict "HarMA is competitive with full fine-tuning" is computed from the numbers, never assumed:
HarMA's test mR at least full fine-tuning's minus `--tolerance` (1.0) mR points; printed with it
are HarMA's trainable share and how much of full fine-tuning's gain over the frozen base it gets.

Default sizes are the demo's (1000 images, 1200 pre-training images, 300 pre-training steps,
600 steps at batch 128): 1500 training steps in all, 1.3-1.45 CPU seconds each (measured), so
~17 min on 2 idle cores; 44 min measured on 2 cores shared with other jobs (load average 3-17).
`--smoke` runs tiny sizes and 2 steps (~25 s; for CI).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import resource
import tempfile
import time
from typing import Any

SMOKE_OVERRIDES: dict[str, Any] = {
    "demo.images": 40,  # 28/6/6 images, 140 train captions
    "demo.pretrain_images": 40,
    "demo.pretrain_steps": 2,
    "demo.pretrain_batch_size": 16,
    "train.steps": 2,
    "train.batch_size": 16,
    "train.eval_every": 2,
    "train.log_every": 1,
}

VARIANTS = ("frozen base", "HarMA", "full fine-tuning")


def _peak_rss_bytes() -> int:
    """High-water RSS of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child_setup(tag: str, threads: int) -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format=f"[{tag}] %(message)s", force=True)
    if threads:
        torch.set_num_threads(threads)


def pretrain_job(pre_cfg_dict: dict, out: str, threads: int) -> dict:
    """The demo's stage 2 in a fresh process: pre-train the base in full, save base.safetensors."""
    _child_setup("pretrain", threads)
    from harma.config import PlatformConfig
    from harma.data.local import load_split
    from harma.model.checkpoint import save_backbone_weights
    from harma.model.harma import build_model
    from harma.train.local import fit_local

    pre_cfg = PlatformConfig.model_validate(pre_cfg_dict)
    base = build_model(pre_cfg.model, seed=pre_cfg.run.seed)
    t0 = time.perf_counter()
    result = fit_local(pre_cfg, os.path.join(out, "pretrain"), model=base,
                       val_split=load_split(pre_cfg.data.root, pre_cfg.data.val_split), save_best=False)
    seconds = time.perf_counter() - t0
    base_uri = os.path.join(out, "base.safetensors")
    save_backbone_weights(base_uri, base)
    return {"base_uri": base_uri, "seconds": seconds, "steps": pre_cfg.train.steps,
            "batch_size": pre_cfg.train.batch_size, "lr": pre_cfg.train.optimizer.lr,
            "final_val": result.history[-1]}


def variant_job(name: str, cfg_dict: dict, train: bool, out: str, threads: int) -> dict:
    """One row of the table, in a fresh process: build, train (if asked), score best-on-val on test."""
    _child_setup(name, threads)
    import gc

    import torch

    from harma.config import PlatformConfig
    from harma.data.local import eval_arrays, load_split
    from harma.model.backbone import build_tokenizer
    from harma.model.checkpoint import load_checkpoint
    from harma.model.harma import build_model, parameter_summary
    from harma.train.evaluate import evaluate_arrays
    from harma.train.local import fit_local

    cfg = PlatformConfig.model_validate(cfg_dict)
    root = cfg.data.root
    model = build_model(cfg.model, seed=cfg.run.seed)
    summary = parameter_summary(model)
    train_split = load_split(root, cfg.data.train_split) if train else None
    val_split = load_split(root, cfg.data.val_split) if train else None
    test_split = load_split(root, cfg.data.test_split)
    tokenizer = build_tokenizer(model.arch.name)
    test_images, test_tokens = eval_arrays(test_split, model.arch.image_size, tokenizer, cfg.data.max_words)
    rss_before = _peak_rss_bytes()
    row: dict[str, Any] = {"variant": name, "trained": train, "parameters": summary,
                           "trainable_params": summary["trainable_params"] if train else 0,
                           "total_params": summary["total_params"],
                           "lr": cfg.train.optimizer.lr if train else None,
                           "steps": cfg.train.steps if train else 0,
                           "device": "cpu", "threads": torch.get_num_threads(), "cuda_peak_bytes": None}
    if train:
        row["load_avg_before"] = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        result = fit_local(cfg, os.path.join(out, "runs", name.replace(" ", "-")), model=model,
                           train_split=train_split, val_split=val_split, save_best=True)
        row["train_seconds"] = time.perf_counter() - t0
        row["train_cpu_seconds"] = time.process_time() - c0  # all threads; less load-dependent
        row["load_avg_after"] = os.getloadavg()[0]
        row["loop_seconds"] = result.seconds  # the step loop alone (after the step-0 validation)
        row["rss_peak_bytes"] = _peak_rss_bytes()  # up to the end of training
        row.update(best_step=result.best_step, best_val=result.best_val,
                   val_history=[{"step": r["step"], "val_mr": r["val_mr"]} for r in result.history
                                if "val_mr" in r],
                   final_loss=result.history[-1].get("loss"))
        del model, result
        gc.collect()
        model, _ = load_checkpoint(os.path.join(out, "runs", name.replace(" ", "-"), "best"))
    row["test"] = evaluate_arrays(model, test_images, test_tokens, test_split.caption_image,
                                  cfg.train.eval_batch_size)
    if not train:
        row.update(train_seconds=0.0, train_cpu_seconds=0.0, loop_seconds=0.0,
                   rss_peak_bytes=_peak_rss_bytes())
    row["rss_before_train_bytes"] = rss_before
    row["test_images"], row["test_captions"] = len(test_split.images), len(test_split.captions)
    return row


# What the fork server imports once; every job is a fresh fork of it (no state of an earlier job).
PRELOAD = ["torch", "open_clip", "harma.data.local", "harma.model.checkpoint", "harma.model.harma",
           "harma.train.evaluate", "harma.train.local"]


def _start_fork_server() -> None:
    """Start the fork server now (a fresh interpreter, not a fork of this one), so that its imports
    overlap this process's own."""
    import multiprocessing.forkserver

    multiprocessing.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()


def _in_fresh_process(fn, *args):
    """fn(*args) in a new process forked from the fork server, which has only imported PRELOAD;
    the process ends with the job."""
    with multiprocessing.get_context("forkserver").Pool(1) as pool:
        return pool.apply(fn, args)


def verdict(rows: dict[str, dict], tolerance: float) -> dict:
    base, harma, full = (rows[v]["test"]["mr"] for v in VARIANTS)
    gap = harma - full
    full_gain = full - base
    return {
        "harma_mr": harma, "full_ft_mr": full, "frozen_mr": base,
        "harma_minus_full_mr": gap, "tolerance_mr": tolerance,
        "competitive": gap >= -tolerance,
        "harma_trainable_share_of_full": rows["HarMA"]["trainable_params"] / rows["full fine-tuning"]["trainable_params"],
        "harma_share_of_full_gain": (harma - base) / full_gain if full_gain > 0 else None,
        "train_time_ratio": rows["HarMA"]["train_seconds"] / rows["full fine-tuning"]["train_seconds"],
    }


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def print_table(rows: dict[str, dict], header: str) -> None:
    from harma.eval import METRIC_KEYS

    print(f"\n{header}")
    cols = ("trainable", "share", "I2T R@1", "R@5", "R@10", "T2I R@1", "R@5", "R@10", "mR",
            "lr", "train s", "CPU s", "RSS MiB", "(before)")
    print(f"{'':<17}" + f"{cols[0]:>10}{cols[1]:>8}" + "".join(f"{c:>8}" for c in cols[2:12])
          + f"{cols[12]:>9}{cols[13]:>9}")
    for name, r in rows.items():
        share = 100.0 * r["trainable_params"] / r["total_params"]
        lr = "-" if r["lr"] is None else f"{r['lr']:.0e}"
        print(f"{name:<17}{r['trainable_params']:>10,}{share:>7.2f}%"
              + "".join(f"{r['test'][k]:>8.2f}" for k in METRIC_KEYS)
              + f"{lr:>8}{r['train_seconds']:>8.1f}{r['train_cpu_seconds']:>8.1f}"
              + f"{_mib(r['rss_peak_bytes']):>9}{_mib(r['rss_before_train_bytes']):>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 steps (seconds; for CI)")
    parser.add_argument("--steps", type=int, default=None, help="step budget of both trained variants "
                        "(default: the demo's 600; 2 with --smoke)")
    parser.add_argument("--harma-lr", type=float, default=5e-3,
                        help="peak lr of HarMA (default 5e-3, the demo's adaptation lr)")
    parser.add_argument("--full-lr", type=float, default=5e-4,
                        help="peak lr of full fine-tuning (default 5e-4: half the base's own pre-training "
                        "lr; a whole backbone takes a lower lr than fresh adapters)")
    parser.add_argument("--tolerance", type=float, default=1.0,
                        help="HarMA counts as competitive when its test mR >= full fine-tuning's minus "
                        "this many mR points (default 1.0)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--workdir", default=None, help="keep data, base and runs here (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/paper_table.json")
    parser.add_argument("overrides", nargs="*", help="dotted.path=value on top of the demo's config")
    args = parser.parse_args()
    t_start = time.perf_counter()
    _start_fork_server()

    # The demo's config and its pre-training stage, resolved here (harma.demo imports Ray): the
    # children get plain config dicts and import only torch, open_clip and the local loop.
    from harma.demo import _pretrain_config, demo_config

    cfg = demo_config(SMOKE_OVERRIDES if args.smoke else None)
    cfg = cfg.with_overrides(args.overrides)
    if args.steps is not None:
        cfg = cfg.with_overrides({"train.steps": args.steps})
    cfg = cfg.with_overrides({"train.eval_every": min(cfg.train.eval_every, cfg.train.steps)})

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="harma-paper-table-")
    work = os.path.abspath(args.workdir or tmp.name)
    try:
        from harma.data.synth import synthesize

        data_root = os.path.join(work, "data")
        print(f"generating {cfg.demo.images} images (+{cfg.demo.pretrain_images} pre-training) in {data_root}")
        t0 = time.perf_counter()
        manifest = synthesize(data_root, cfg.demo.images, seed=cfg.run.seed,
                              pretrain_images=cfg.demo.pretrain_images)
        synth_s = time.perf_counter() - t0
        print(f"pre-training the {cfg.model.backbone.arch} base in full ({cfg.demo.pretrain_steps} steps)")
        pre = _in_fresh_process(pretrain_job, _pretrain_config(cfg, data_root).to_dict(), work, args.threads)

        common = {"data.root": data_root, "model.backbone.weights_uri": pre["base_uri"]}
        configs = {
            "frozen base": (cfg.with_overrides({**common, "model.adapter.kind": "none"}), False),
            "HarMA": (cfg.with_overrides({**common, "model.adapter.kind": "harma",
                                          "model.adapter.layout": "official",
                                          "train.optimizer.lr": args.harma_lr}), True),
            "full fine-tuning": (cfg.with_overrides({**common, "model.adapter.kind": "none",
                                                     "model.train_backbone": True,
                                                     "train.optimizer.lr": args.full_lr}), True),
        }
        rows = {}
        for name in VARIANTS:
            vcfg, train = configs[name]
            print(f"{name}: {'training ' + str(vcfg.train.steps) + ' steps' if train else 'scoring'} in a fresh process")
            rows[name] = _in_fresh_process(variant_job, name, vcfg.with_overrides(
                {"run.name": name.replace(" ", "-").lower()}).to_dict(), train, work, args.threads)
    finally:
        if tmp is not None:
            tmp.cleanup()
    wall = time.perf_counter() - t_start

    v = verdict(rows, args.tolerance)
    splits = manifest.get("splits", manifest)
    header = (f"{cfg.model.backbone.arch}, generated split {json.dumps(splits)} (seed {cfg.run.seed}), "
              f"{cfg.train.steps} steps at batch {cfg.train.batch_size} for both trained variants, each at "
              f"its own peak lr (HarMA {args.harma_lr:g}, full FT {args.full_lr:g}); best checkpoint on "
              f"val, scored on test; CPU, {rows['HarMA']['threads']} torch thread(s); RSS = peak of the "
              f"variant's own process up to the end of training (before: data and model loaded); CPU s = "
              f"the training's CPU time, all threads (load average {os.getloadavg()[0]:.1f} at the end)")
    print_table(rows, header)
    print(f"\nHarMA test mR {v['harma_mr']:.2f} vs full fine-tuning {v['full_ft_mr']:.2f} "
          f"({v['harma_minus_full_mr']:+.2f} points; frozen base {v['frozen_mr']:.2f}), training "
          f"{rows['HarMA']['trainable_params']:,} parameters = {100 * v['harma_trainable_share_of_full']:.2f}% of "
          f"full fine-tuning's {rows['full fine-tuning']['trainable_params']:,}, in "
          f"{v['train_time_ratio']:.2f}x its training time"
          + (f"; HarMA recovers {100 * v['harma_share_of_full_gain']:.0f}% of full fine-tuning's gain over the frozen base"
             if v["harma_share_of_full_gain"] is not None else "; full fine-tuning did not improve on the frozen base"))
    print(f"'HarMA is competitive with full fine-tuning' (HarMA mR >= full FT mR - {args.tolerance:g}): "
          f"{'HOLDS' if v['competitive'] else 'DOES NOT HOLD'} here"
          + (" (smoke sizes: not meaningful)" if args.smoke else ""))
    print(f"wall time {wall:.1f} s (data {synth_s:.1f} s, pre-training {pre['seconds']:.1f} s)")

    result = {"smoke": args.smoke, "arch": cfg.model.backbone.arch, "dataset": manifest,
              "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "seed": cfg.run.seed,
              "lrs": {"HarMA": args.harma_lr, "full fine-tuning": args.full_lr,
                      "note": "each trained variant used its own peak lr"},
              "pretrain": pre, "variants": rows, "verdict": v, "wall_seconds": wall,
              "synth_seconds": synth_s, "cpu_count": os.cpu_count(),
              "config": configs["HarMA"][0].to_dict()}
    from harma import storage

    storage.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
