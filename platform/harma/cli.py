"""The `harma` command line (also `python -m harma`).

    harma demo [--out DIR] [--config FILE] [overrides]      the main job, end to end
    harma config validate FILE [overrides]                   check a job file
    harma config show FILE [overrides]                       print the resolved config
    harma model summary --config FILE [overrides] [--json]   architecture and parameter counts
    harma data synth --out DIR --images N --seed S           generate an aerial dataset
    harma data synth --out DIR --scenes N [--scene-size 4096] generate georeferenced COG scenes + STAC
    harma data prepare --scenes DIR --out OUT [--test-scenes 1] their captioned tiles -> training shards
    harma eval --checkpoint URI [--split test] [--data ROOT] [--out FILE]
    harma index build --config FILE [overrides]              embed a corpus into a retrieval index
    harma index add --index URI [--corpus URI] [splits=[..] actors=N ...]   embed only what is new: next version
    harma index delete --index URI (--ids ID .. | --ids-file F | --scene S ..)   next version without them
    harma index versions URI [--json]                        the versions of an index and their changes
    harma serve serve_configs/FILE.yaml [overrides] [--address ADDR]   run the Serve app locally (serve run)
    harma submit jobs/FILE.yaml [overrides] [--address URL] [--no-wait]   a Ray job on a cluster
    harma jobs list | status ID | logs ID [--follow] | stop ID [--address URL]

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
    for noisy in ("matplotlib", "PIL", "faiss"):  # faiss: its CPU-feature probing at INFO
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
    if args.scenes:
        from harma.geo.scenes import synthesize_scenes

        summary = synthesize_scenes(args.out, args.scenes, seed=args.seed, size=args.scene_size,
                                    progress=logging.getLogger("harma").info)
        print(json.dumps(summary, indent=1))
        return 0
    if not args.images:
        raise SystemExit("harma data synth: give --images N (tiles) or --scenes N (GeoTIFF scenes)")
    from harma.data.synth import synthesize

    manifest = synthesize(args.out, args.images, seed=args.seed, pretrain_images=args.pretrain_images,
                          image_size=args.image_size, progress=logging.getLogger("harma").info)
    print(json.dumps(manifest, indent=1))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    _setup_logging()
    if args.scenes:
        from harma.geo.training import prepare_scenes

        report = prepare_scenes(args.scenes, args.out, test_scenes=args.test_scenes, shard_images=args.shard_images,
                                progress=logging.getLogger("harma").info)
        for split, r in report["splits"].items():
            print(f"{split:>8}: {r['images']} tiles, {r['captions']} captions, {r['shards']} shard(s)")
        print(f"held out as test: {', '.join(report['test_scenes'])}; {report['skipped_nodata_cells']} "
              f"mostly-nodata cell(s) skipped; report: {args.out}/prepare_report.json")
        return 0
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
    waited = (f"; waited {result.input_wait_seconds:.0f} s of {result.loop_seconds:.0f} s for input"
              if result.loop_seconds else "")
    print(f"\n{result.steps} steps on {result.world_size} worker(s) in {result.seconds:.0f} s{waited}; "
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
    if args.geo:
        return _eval_geo(args)
    if args.config:
        return _eval_job(args)
    if not args.checkpoint:
        raise ConfigError("give --checkpoint URI or --config FILE with an eval: section")
    from harma.data.local import load_split
    from harma.model.checkpoint import load_checkpoint, require_checkpoint
    from harma.train.evaluate import evaluate_split

    require_checkpoint(args.checkpoint)
    model, cfg = load_checkpoint(args.checkpoint)
    root = args.data or cfg.data.root
    split_name = args.split or cfg.data.test_split
    split = load_split(root, split_name)
    report = evaluate_split(model, split, cfg.data.max_words, cfg.train.eval_batch_size)
    result = {"checkpoint": args.checkpoint, "data": root, "split": split_name,
              "images": len(split.images), "captions": len(split), **report}
    return _report_eval(result, args.out)


def _eval_geo(args: argparse.Namespace) -> int:
    """`harma eval --geo`: place search precision@k / recall per class (harma.geo.evaluate)."""
    if not args.index or not args.truth:
        raise ConfigError("harma eval --geo needs --index URI and --truth GEOJSON")
    from harma import storage
    from harma.geo.evaluate import format_scores, place_search_scores, read_truth
    from harma.geo.query import parse_place
    from harma.serve.encoder import QueryEncoder
    from harma.serve.index import load_index

    index = load_index(args.index)
    bbox = [float(v) for v in args.bbox.split(",")] if args.bbox else None
    place = parse_place(bbox=bbox, scene=args.scene)
    encoder = QueryEncoder(index.manifest["checkpoint_uri"], "auto", trace=False)
    result = place_search_scores(index, encoder, read_truth(args.truth), k=args.k, place=place)
    result.update(index=args.index, truth=args.truth, checkpoint=index.manifest["checkpoint_uri"], bbox=bbox,
                  scenes=args.scene)
    print(format_scores(result))
    out = args.out or storage.join(args.index, "eval_geo.json")
    storage.write_bytes(out, json.dumps(result, indent=1).encode())
    print(f"written: {out}")
    return 0


def _report_eval(result: dict, out: str | None) -> int:
    """Print an eval's tables (both tie protocols, per class) and write its JSON.

    The JSON (default: <checkpoint>/eval_<split>.json) holds "metrics" (pessimistic ties, the
    default), "metrics_official" and "per_class" (harma.eval.evaluation_report).
    """
    from harma import storage
    from harma.eval import format_class_table, format_table

    print(f"{result['split']}: {result['images']} images, {result['captions']} captions")
    print(format_table({result["metrics"]["protocol"]: result["metrics"],
                        "official ties": result["metrics_official"]}))
    print("(official ties: the paper code's np.argsort reversed; pessimistic: a tied relevant item "
          "ranks after every tied one)")
    per_class = result.get("per_class")
    if per_class:
        src = per_class["label_sources"]
        print(f"\nper scene class (each class's queries ranked against the whole gallery; labels: "
              f"{src['label_name']} from annotations, {src['file_name']} from file names, "
              f"{src['none']} unlabelled):")
        print(format_class_table(per_class))
    out = out or storage.join(result["checkpoint"], f"eval_{result['split']}.json")
    storage.write_bytes(out, json.dumps(result, indent=1).encode())
    print(f"wrote {out}")
    return 0


def _eval_job(args: argparse.Namespace) -> int:
    """`harma eval --config FILE`: the eval: section against prepared shards (a Ray-free job)."""
    from harma.model.checkpoint import read_checkpoint_config, require_checkpoint
    from harma.train.evaluate import evaluate_prepared

    cfg = load_config(args.config, args.overrides)
    if cfg.eval is None:
        raise ConfigError(f"{args.config}: no eval: section (eval.checkpoint_uri, eval.split)")
    job = cfg.eval
    require_checkpoint(job.checkpoint_uri)
    prepared = job.prepared_uri or read_checkpoint_config(job.checkpoint_uri).data.prepared_uri
    if not prepared:
        raise ConfigError("eval.prepared_uri is not set and the checkpoint's config has no data.prepared_uri")
    report = evaluate_prepared(job.checkpoint_uri, prepared, job.split)
    return _report_eval({"checkpoint": job.checkpoint_uri, "data": prepared, "split": job.split, **report},
                        job.out)


def cmd_index_build(args: argparse.Namespace) -> int:
    _setup_logging()
    cfg = load_config(args.config, args.overrides)
    if cfg.index is None:
        raise ConfigError(f"{args.config}: no index: section (index.checkpoint_uri, index.corpus_uri, "
                          "index.output_uri)")
    from harma.model.checkpoint import require_checkpoint
    from harma.serve.build import build_index
    from harma.train.driver import ensure_ray

    require_checkpoint(cfg.index.checkpoint_uri)  # before any cluster starts
    ensure_ray()
    manifest = build_index(cfg.index, progress=logging.getLogger("harma").info)
    print(f"index {cfg.index.output_uri}: {manifest['images']} images, {manifest['captions']} captions, "
          f"{len(manifest['skipped'])} skipped, checkpoint {manifest['checkpoint_uri']} "
          f"(fingerprint {manifest['checkpoint_fingerprint'][:12]})")
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    _setup_logging()
    from harma.config import parse_override
    from harma.index.update import add_to_index
    from harma.serve.index import read_manifest
    from harma.train.driver import ensure_ray

    settings = dict(parse_override(o) for o in args.settings)
    settings = {k.removeprefix("index."): v for k, v in settings.items()}
    if args.corpus:
        settings["corpus_uri"] = args.corpus
    read_manifest(args.index)  # before any cluster starts
    ensure_ray()
    manifest = add_to_index(args.index, settings, progress=logging.getLogger("harma").info)
    print(f"index version {manifest['version']}: +{manifest['change']['added']} images "
          f"(+{manifest['change']['added_captions']} captions) -> {manifest['images']} images; {_how_to_serve(manifest)}")
    return 0


def _how_to_serve(manifest: dict) -> str:
    """How a running application moves to the version an update wrote."""
    from harma.index.versions import version_uri

    uri = version_uri(manifest["root_uri"], manifest["version"])
    before, after = manifest["change"].get("shards") or (None, None)
    if before != after:
        return (f"its shard count changed ({before} -> {after}): serve it by deploying the application again "
                f"with args.index_uri: {uri}")
    return f"serve it with user_config: {{index_uri: {uri}}}"


def cmd_index_delete(args: argparse.Namespace) -> int:
    _setup_logging()
    from harma import storage
    from harma.index.update import delete_from_index

    ids = list(args.ids or [])
    if args.ids_file:
        ids += [line.strip() for line in storage.read_bytes(args.ids_file).decode().splitlines() if line.strip()]
    manifest = delete_from_index(args.index, ids, args.scene or [], args.missing_ok,
                                 progress=logging.getLogger("harma").info)
    print(f"index version {manifest['version']}: -{manifest['change']['deleted']} images "
          f"(-{manifest['change']['deleted_captions']} captions) -> {manifest['images']} images; {_how_to_serve(manifest)}")
    return 0


def cmd_index_versions(args: argparse.Namespace) -> int:
    from harma import storage
    from harma.index.versions import format_versions, list_versions

    versions = list_versions(storage.absolute(args.uri))
    print(json.dumps(versions, indent=1) if args.json else format_versions(versions))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Validate a serve config, make its local paths absolute, check each index, then `serve run` it."""
    import os
    import subprocess
    import tempfile

    import yaml

    from harma.model.checkpoint import require_checkpoint
    from harma.serve.configs import HARMA_IMPORT_PATH, load_serve_config, resolve_local_paths
    from harma.serve.index import check_index_matches, checkpoint_fingerprint, read_manifest

    raw = resolve_local_paths(load_serve_config(args.file, args.overrides))
    for app in raw["applications"]:  # checked before any cluster starts
        if app.get("import_path") == HARMA_IMPORT_PATH:
            app_args = app["args"]
            require_checkpoint(app_args["checkpoint_uri"])
            fingerprint = checkpoint_fingerprint(app_args["checkpoint_uri"])
            swapped = [(d.get("user_config") or {}).get("index_uri") for d in app.get("deployments", [])]
            for index_uri in [app_args["index_uri"]] + [u for u in swapped if u]:
                check_index_matches(read_manifest(index_uri), app_args["checkpoint_uri"], fingerprint)
            # The replicas read checkpoint and index with this shell's storage settings (an S3
            # endpoint, credentials): a cluster started earlier, or elsewhere, lacks them. The
            # temporary file holding them is private (0600) and removed when serving ends.
            from harma.train.driver import worker_env

            env_vars = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
            for key, value in worker_env().items():
                env_vars.setdefault(key, value)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="harma-serve-", delete=False) as tmp:
        yaml.safe_dump(raw, tmp, sort_keys=False)
    import shutil
    from pathlib import Path

    beside = Path(sys.executable).parent / "serve"  # the venv's `serve`, even when not on PATH
    serve_cli = str(beside) if beside.exists() else (shutil.which("serve") or "serve")
    command = [serve_cli, "run", tmp.name] + (["--address", args.address] if args.address else [])
    http = raw.get("http_options") or {}
    env = dict(os.environ)
    if not args.address and not env.get("RAY_ADDRESS"):
        from harma.serve.ingress import ensure_fast_ingress

        ensure_fast_ingress(env)  # `serve run` starts a local cluster: HAProxy ingress there
    print(f"serving {args.file} at http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}/ "
          "(Ctrl-C stops it)", flush=True)
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0
    finally:
        os.unlink(tmp.name)


def cmd_submit(args: argparse.Namespace) -> int:
    from harma.jobs import submit

    return submit(args.file, args.overrides, args.address, wait=args.wait, runtime_env_file=args.runtime_env)


def cmd_jobs(args: argparse.Namespace) -> int:
    from harma import jobs

    if args.action == "list":
        rows = jobs.list_jobs(args.address)
        for row in rows:
            print(f"{row['id']:<48} {row['status']:<10} {row['entrypoint']}")
        print(f"{len(rows)} job(s)")
    elif args.action == "status":
        info = jobs.job_status(args.address, args.id)
        print(f"{info['id']}: {info['status']}  {info['message'] or ''}\n  {info['entrypoint']}")
        return 0 if info["status"] in ("SUCCEEDED", "RUNNING", "PENDING") else 1
    elif args.action == "logs":
        jobs.job_logs(args.address, args.id, follow=args.follow)
    elif args.action == "stop":
        print(f"{args.id}: {'stop requested' if jobs.stop_job(args.address, args.id) else 'already finished'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _setup_logging()
    from harma.demo import demo_config, run_demo
    from harma.eval import format_table

    cfg = demo_config(args.overrides, args.config)
    report = run_demo(cfg, args.out, port=args.port, keep_serving=args.serve)
    print()
    print(format_table({"frozen base": report["test_before"], "HarMA-adapted": report["test_after"]}))
    print(f"\ntest mR {report['test_before']['mr']:.2f} -> {report['test_after']['mr']:.2f} "
          f"({report['mr_gain']:+.2f}) with {report['parameters']['trainable_params']:,} trainable "
          f"parameters; wall time {report['wall_seconds']:.0f} s")
    served = report["serving"]
    print(f"\nsearch service over {served['images']} test images ({served['index']}):")
    for query in served["queries"]:
        top = query["results"][0] if query["results"] else {"id": "-", "score": float("nan")}
        print(f"  {query['text']!r}: top {top['id']} ({top['score']:.3f}), {query['took_ms']:.1f} ms")
    print(f"web page: {served['url']} (up while the demo ran; --serve keeps it up; later: "
          "harma serve serve_configs/demo.yaml)")
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
    demo.add_argument("--port", type=int, default=8000, help="HTTP port of the search service "
                      "(a free one is taken when it is busy)")
    demo.add_argument("--serve", action="store_true", help="keep the search service running at the end")
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
    synth.add_argument("--images", type=int, default=0, help="downstream images (train+val+test)")
    synth.add_argument("--scenes", type=int, default=0,
                       help="instead: georeferenced COG scenes with a STAC ItemCollection and object footprints")
    synth.add_argument("--scene-size", type=int, default=4096, help="pixels a side of each scene")
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
    prep.add_argument("--scenes", default=None,
                      help="instead: generated scenes (harma data synth --scenes): their captioned cells as tiles")
    prep.add_argument("--test-scenes", type=int, default=1, help="with --scenes: scenes held out whole as test")
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
    ev.add_argument("--checkpoint", default=None, help="checkpoint folder or s3:// prefix")
    ev.add_argument("--config", default=None, help="job file with an eval: section (instead of --checkpoint)")
    ev.add_argument("--data", default=None, help="dataset root (default: the checkpoint's data.root)")
    ev.add_argument("--split", default=None, help="split name (default: the config's test split)")
    ev.add_argument("--out", default=None, help="JSON output (default: <checkpoint>/eval_<split>.json)")
    ev.add_argument("--geo", action="store_true",
                    help="score place search of a scene index against ground-truth footprints instead")
    ev.add_argument("--index", default=None, help="with --geo: the scene index")
    ev.add_argument("--truth", default=None, help="with --geo: ground-truth GeoJSON (class per object)")
    ev.add_argument("--k", type=int, default=10, help="with --geo: tiles per class query")
    ev.add_argument("--bbox", default=None, help="with --geo: min_lon,min_lat,max_lon,max_lat to search within")
    ev.add_argument("--scene", nargs="+", default=None, help="with --geo: scene ids to search within")
    ev.add_argument("overrides", nargs="*", help="with --config: dotted.path=value")
    ev.set_defaults(func=cmd_eval)

    index = sub.add_parser("index", help="retrieval indexes").add_subparsers(dest="action", required=True)
    ib = index.add_parser("build", help="embed a corpus with a checkpoint (Ray Data) into an index")
    ib.add_argument("--config", required=True, help="job file with an index: section")
    ib.add_argument("overrides", nargs="*")
    ib.set_defaults(func=cmd_index_build)
    ia = index.add_parser("add", help="embed only the corpus items an index lacks into its next version")
    ia.add_argument("--index", required=True, help="the index (any version) to add to")
    ia.add_argument("--corpus", default=None, help="corpus to take new items from (default: the index's own)")
    ia.add_argument("settings", nargs="*", help="splits=[train,test] actors=N batch_size=N use_gpu=true ...")
    ia.set_defaults(func=cmd_index_add)
    idl = index.add_parser("delete", help="write the next version of an index without some items")
    idl.add_argument("--index", required=True, help="the index (any version) to delete from")
    idl.add_argument("--ids", nargs="+", default=None, help="image ids (as search results show them)")
    idl.add_argument("--ids-file", default=None, help="a file (or s3:// object) of ids, one a line")
    idl.add_argument("--scene", nargs="+", default=None, help="scene ids of a scene index: all their tiles")
    idl.add_argument("--missing-ok", action="store_true", help="delete those present, ignore the others")
    idl.set_defaults(func=cmd_index_delete)
    iv = index.add_parser("versions", help="list an index's versions with their manifests' summaries")
    iv.add_argument("uri", help="the index root (what harma index build wrote)")
    iv.add_argument("--json", action="store_true", help="print JSON")
    iv.set_defaults(func=cmd_index_versions)

    srv = sub.add_parser("serve", help="validate a serve config and run it locally (`serve run`)")
    srv.add_argument("file", help="serve_configs/FILE.yaml")
    srv.add_argument("overrides", nargs="*",
                     help="dotted.path=value into the file (args.index_uri=..., applications.NAME.deployments.0...)")
    srv.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    srv.set_defaults(func=cmd_serve)

    sm = sub.add_parser("submit", help="validate a job file, submit it as a Ray job, follow its logs")
    sm.add_argument("file", help="jobs/FILE.yaml")
    sm.add_argument("overrides", nargs="*")
    sm.add_argument("--address", default=None, help="dashboard URL (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    sm.add_argument("--no-wait", dest="wait", action="store_false", help="print the job id and return")
    sm.add_argument("--runtime-env", default=str(_default_runtime_env()), help="runtime env YAML (default: jobs/runtime_env.yaml)")
    sm.set_defaults(func=cmd_submit)

    jb = sub.add_parser("jobs", help="Ray jobs on a cluster").add_subparsers(dest="action", required=True)
    for name in ("list", "status", "logs", "stop"):
        p = jb.add_parser(name)
        if name != "list":
            p.add_argument("id", help="submission id (harma submit prints it)")
        if name == "logs":
            p.add_argument("--follow", action="store_true")
        p.add_argument("--address", default=None)
        p.set_defaults(func=cmd_jobs)
    return parser


def _default_runtime_env():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "jobs" / "runtime_env.yaml"


def _job_error() -> type[Exception]:
    from harma.jobs import JobError

    return JobError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as err:
        print(f"harma: config error: {err}", file=sys.stderr)
        return 2

    except _job_error() as err:
        print(f"harma: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"harma: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harma: interrupted", file=sys.stderr)
        return 130


def entrypoint() -> None:
    """The `harma` command and `python -m harma`: `main` in a process whose stderr is filtered of
    Ray's C++ log lines (harma.console.gate_native_stderr)."""
    from harma.console import gate_native_stderr

    gate_native_stderr()
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
