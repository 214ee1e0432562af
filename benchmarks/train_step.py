"""Train-step benchmark: pairs/s end to end (object storage -> Ray Data -> DeepSpeed step) vs the
bare model step on in-memory tensors, same machine, same run.

    .ci/venv python benchmarks/train_step.py [--arch harma-tiny] [--workers 1 2] [--zero 0]
        [--precision fp32] [--out benchmarks/results/train_step.json] [--smoke]

Bare: one process, `train_step` with a plain torch optimizer on one fixed in-memory batch
(torch's default threads). End to end: `harma.train.fit` on a prepared dataset in a local
object-storage folder; the rate is rank 0's pairs x workers over its time in the step loop (data
waits included, validation and checkpoints excluded), without the wait for the run's very first
batch (worker processes starting: a fixed cost per run, shown apart with the ratio it would give;
every later epoch's first-batch wait is counted). On a GPU machine run with
`--arch ViT-B-32 --precision bf16 --gpu --zero 0 1 2` (target there: >= 0.85 of bare).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def bare_pairs_per_s(arch: str, batch: int, steps: int, device: str, precision: str) -> float:
    from harma.config import LossConfig, ModelConfig, OptimizerConfig, ScheduleConfig
    from harma.model import build_model
    from harma.model.backbone import build_tokenizer
    from harma.train.optim import build_optimizer, build_scheduler
    from harma.train.step import TorchEngine, train_step

    cfg = ModelConfig.model_validate({"backbone": {"arch": arch}})
    model = build_model(cfg).to(device)
    opt = build_optimizer(model, OptimizerConfig())
    engine = TorchEngine(model, opt, build_scheduler(opt, 10**6, ScheduleConfig()))
    size = model.arch.image_size
    # The tokenizer returns numpy (it runs in Ray Data tasks that import no torch).
    tok = torch.from_numpy(build_tokenizer(arch)([f"{i} red storage tanks next to a river" for i in range(batch)]))
    data = {"image": torch.randn(batch, 3, size, size, device=device), "tokens": tok.to(device),
            "image_id": torch.arange(batch, device=device)}
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                              enabled=precision == "bf16")
    with autocast:
        for _ in range(3):
            train_step(engine, data, LossConfig())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(engine, data, LossConfig())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="harma-tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--zero", type=int, nargs="+", default=[0])
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, tiny sizes (CI runs it so a broken benchmark is a red CI)")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.images, args.epochs, args.workers = 16, 60, 1, [1]
    from harma.config import PlatformConfig
    from harma.data.prepare import prepare_dataset
    from harma.data.synth import synthesize
    from harma.train.driver import ensure_ray, fit

    device = "cuda" if args.gpu else "cpu"
    bare = bare_pairs_per_s(args.arch, args.batch, 3 if args.smoke else 20, device, args.precision)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(f"{tmp}/raw", args.images, seed=0)
        prepare_dataset(f"{tmp}/raw", f"{tmp}/store", ["train", "val", "test"])
        ensure_ray()
        for zero in args.zero:
            for workers in args.workers:
                cfg = PlatformConfig().with_overrides({
                    "run.name": f"bench-z{zero}-w{workers}", "run.output_dir": f"{tmp}/runs",
                    "data.prepared_uri": f"{tmp}/store", "model.backbone.arch": args.arch,
                    "model.backbone.precision": args.precision, "train.batch_size": args.batch,
                    "train.epochs": args.epochs, "train.deepspeed.zero_stage": zero,
                    "train.workers.min": workers, "train.workers.max": workers,
                    "train.workers.use_gpu": args.gpu,
                    "train.workers.cpus_per_worker": 1 if not args.gpu else 4, "train.log_every": 1000})
                result = fit(cfg, evaluate_test=False)  # the test split's scores are not measured here
                pairs = result.pairs_per_worker * workers
                rate = pairs / (result.loop_seconds - result.startup_wait_seconds)  # steady state
                rate_all = pairs / result.loop_seconds  # with the stream's start-up
                rows.append({"zero": zero, "workers": workers, "pairs_per_s": rate, "ratio": rate / bare,
                             "pairs_per_s_with_startup": rate_all, "ratio_with_startup": rate_all / bare,
                             "startup_s": result.startup_wait_seconds, "steps": result.steps,
                             "device": result.device, "input_wait": result.input_wait_seconds / result.loop_seconds})
    print(f"bare model step ({device}, in-memory batch {args.batch}): {bare:.1f} pairs/s")
    print(f"{'ZeRO':>5}{'workers':>9}{'pairs/s':>10}{'vs bare':>9}{'start-up s':>12}{'vs bare with it':>17}"
          f"{'input wait':>12}  device")
    for r in rows:  # input wait: rank 0's share of the loop spent waiting for the next batch
        print(f"{r['zero']:>5}{r['workers']:>9}{r['pairs_per_s']:>10.1f}{r['ratio']:>9.2f}{r['startup_s']:>12.1f}"
              f"{r['ratio_with_startup']:>17.2f}{r['input_wait']:>11.0%}  {r['device']}")
    from harma import storage

    storage.write_json(args.out, {"arch": args.arch, "device": device, "precision": args.precision,
                                  "batch": args.batch, "bare_pairs_per_s": bare, "runs": rows})


if __name__ == "__main__":
    main()
