"""The `harma` command line (also `python -m harma`).

    harma demo [--out DIR] [--config FILE] [overrides]      the main job, end to end
    harma config validate FILE [overrides]                   check a job file
    harma config show FILE [overrides]                       print the resolved config
    harma model summary --config FILE [overrides] [--json]   architecture and parameter counts
    harma data synth --out DIR --images N --seed S           generate an aerial dataset
    harma eval --checkpoint URI [--split test] [--data ROOT] [--out FILE]

Overrides are `dotted.path=value` (e.g. `model.adapter.rank=32`). Every command returns an exit
code from `main(argv)`; errors print one clear message and exit 2 (bad input) or 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from harma.config import ConfigError, load_config


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --- commands --------------------------------------------------------------------------------
def cmd_config_validate(args: argparse.Namespace) -> int:
    load_config(args.file, args.overrides)
    print(f"{args.file}: valid")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    print(load_config(args.file, args.overrides).to_yaml(), end="")
    return 0


def cmd_model_summary(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from harma.model import build_model, parameter_summary

    model = build_model(cfg.model.model_copy(update={"backbone": cfg.model.backbone.model_copy(
        update={"weights_uri": None})}), seed=cfg.run.seed)
    info = {
        "arch": cfg.model.backbone.arch,
        "adapter_kind": cfg.model.adapter.kind,
        "adapter_layout": cfg.model.adapter.layout,
        "adapter_rank": cfg.model.adapter.rank,
        "mini_rank": cfg.model.adapter.mini_rank,
        "image_size": model.arch.image_size,
        "context_length": model.arch.context_length,
        "embed_dim": model.arch.embed_dim,
        **parameter_summary(model),
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for key, value in info.items():
            print(f"{key:>26}: {value:,}" if isinstance(value, int) else f"{key:>26}: {value}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    _setup_logging()
    from harma.data.synth import synthesize

    manifest = synthesize(args.out, args.images, seed=args.seed, pretrain_images=args.pretrain_images,
                          image_size=args.image_size, progress=logging.getLogger("harma").info)
    print(json.dumps(manifest, indent=1))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    _setup_logging()
    from harma.data.prepare import prepare_dataset

    report = prepare_dataset(args.source, args.out, args.splits, annotations=args.annotations,
                             images=args.images, shard_images=args.shard_images,
                             progress=logging.getLogger("harma").info)
    bad = {s: len(r["missing"]) + len(r["undecodable"]) for s, r in report["splits"].items()}
    for split, r in report["splits"].items():
        print(f"{split:>8}: {r['images']} images, {r['captions']} captions, {r['shards']} shard(s), "
              f"{bad[split]} unusable")
        for key in (r["missing"] + r["undecodable"])[:20]:
            print(f"          unusable: {key}")
    print(f"report: {args.out}/prepare_report.json")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _setup_logging()
    cfg = load_config(args.config, args.overrides)
    from harma.eval import format_table
    from harma.train.driver import fit

    result = fit(cfg)
    print()
    print(format_table({"best val": result.best_val, "test (best on val)": result.test}))
    print(f"\n{result.steps} steps on {result.world_size} worker(s) in {result.seconds:.0f} s; "
          f"restarts: {len(result.restarts)}; unusable images: {len(result.bad_images)}")
    print(f"best checkpoint: {result.best_checkpoint}\nreport: {result.report_dir}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    _setup_logging()
    cfg = load_config(args.config, args.overrides)
    from harma.tune.sweep import format_rows, sweep

    result = sweep(cfg)
    print()
    print(format_rows(result.rows))
    print(f"\nbest: {result.best.trial} (val mR {result.best.val_mr:.2f}, test mR {result.best.test_mr:.2f}); "
          f"{len(result.rows)} trials, {sum(r.stopped_early for r in result.rows)} stopped early, "
          f"{result.seconds:.0f} s")
    print(f"summary: {result.sweep_dir}/summary  best job file: {result.best_config_path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _setup_logging()
    from harma import storage
    from harma.data.local import eval_arrays, load_split
    from harma.eval import format_table
    from harma.model.backbone import build_tokenizer
    from harma.model.checkpoint import load_checkpoint
    from harma.train.evaluate import evaluate_arrays

    model, cfg = load_checkpoint(args.checkpoint)
    root = args.data or cfg.data.root
    split_name = args.split or cfg.data.test_split
    split = load_split(root, split_name)
    images, tokens = eval_arrays(split, model.arch.image_size, build_tokenizer(model.arch.name),
                                 cfg.data.max_words)
    metrics = evaluate_arrays(model, images, tokens, split.caption_image)
    print(format_table({f"{split_name} ({len(split.images)} img)": metrics}))
    result = {"checkpoint": args.checkpoint, "data": root, "split": split_name,
              "images": len(split.images), "captions": len(split), "metrics": metrics}
    out = args.out or storage.join(args.checkpoint, f"eval_{split_name}.json")
    storage.write_bytes(out, json.dumps(result, indent=1).encode())
    print(f"wrote {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging()
    from harma.demo import demo_config, run_demo
    from harma.eval import format_table

    cfg = demo_config(args.overrides, args.config)
    report = run_demo(cfg, args.out)
    print()
    print(format_table({"frozen base": report["test_before"], "HarMA-adapted": report["test_after"]}))
    print(f"\ntest mR {report['test_before']['mr']:.2f} -> {report['test_after']['mr']:.2f} "
          f"({report['mr_gain']:+.2f}) with {report['parameters']['trainable_params']:,} trainable "
          f"parameters; wall time {report['wall_seconds']:.0f} s")
    print(f"report: {args.out}/report (metrics.json, training.png, table.txt)")
    return 0


# --- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harma", description="HarMA adapters for remote-sensing "
                                     "image-text retrieval: train, evaluate, serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole method end to end on generated data")
    demo.add_argument("--out", default="harma-demo", help="output folder (default: harma-demo)")
    demo.add_argument("--config", default=None, help="job file (default: built-in demo settings)")
    demo.add_argument("overrides", nargs="*", help="dotted.path=value")
    demo.set_defaults(func=cmd_demo)

    config = sub.add_parser("config", help="validate or show a job file").add_subparsers(
        dest="action", required=True)
    for name, func in (("validate", cmd_config_validate), ("show", cmd_config_show)):
        p = config.add_parser(name)
        p.add_argument("file")
        p.add_argument("overrides", nargs="*")
        p.set_defaults(func=func)

    model = sub.add_parser("model", help="inspect a model").add_subparsers(dest="action", required=True)
    summary = model.add_parser("summary", help="architecture and parameter counts")
    summary.add_argument("--config", required=True)
    summary.add_argument("--json", action="store_true")
    summary.add_argument("overrides", nargs="*")
    summary.set_defaults(func=cmd_model_summary)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    synth = data.add_parser("synth", help="generate an aerial dataset in the RSITMD layout")
    synth.add_argument("--out", required=True, help="folder or s3:// prefix")
    synth.add_argument("--images", type=int, required=True, help="downstream images (train+val+test)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--pretrain-images", type=int, default=0, help="images of a coarse pre-training split")
    synth.add_argument("--image-size", type=int, default=96)
    synth.set_defaults(func=cmd_data_synth)

    prep = data.add_parser("prepare", help="annotations + images -> sharded Parquet (local or s3://)")
    prep.add_argument("--source", default=None, help="dataset folder with annotations/ and images/")
    prep.add_argument("--annotations", default=None, help="folder of <split>.json (default: SOURCE/annotations)")
    prep.add_argument("--images", default=None, help="image root (default: SOURCE/images)")
    prep.add_argument("--out", required=True, help="output folder or s3:// prefix")
    prep.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    prep.add_argument("--shard-images", type=int, default=512, help="images per Parquet shard")
    prep.set_defaults(func=cmd_data_prepare)

    train = sub.add_parser("train", help="Ray Train + DeepSpeed fine-tuning from prepared shards")
    train.add_argument("--config", required=True)
    train.add_argument("overrides", nargs="*")
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser("tune", help="Ray Tune sweep of tune.search_space with early stopping")
    tune.add_argument("--config", required=True)
    tune.add_argument("overrides", nargs="*")
    tune.set_defaults(func=cmd_tune)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a split")
    ev.add_argument("--checkpoint", required=True, help="checkpoint folder or s3:// prefix")
    ev.add_argument("--data", default=None, help="dataset root (default: the checkpoint's data.root)")
    ev.add_argument("--split", default=None, help="split name (default: the config's test split)")
    ev.add_argument("--out", default=None, help="JSON output (default: <checkpoint>/eval_<split>.json)")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as err:
        print(f"harma: config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"harma: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harma: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
