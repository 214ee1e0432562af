"""The RSITMD/RSICD train jobs are the official HarMA recipes, except where their headers say so.

The official values are written out below, each with the section of the spec it comes from
(shared/docs/harma-method.md: 1.x architecture, 2.x losses, 3 training recipe, 4 evaluation).
Every recipe field of each train file's resolved config is compared with them; a file may differ
only where DEPARTURES lists it, and every departure must be stated in the file's header comment.
"""

from functools import reduce
from pathlib import Path

import pytest
import yaml

from harma.config import PlatformConfig, load_config
from harma.model.backbone import load_arch_config

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"

# --------------------------------------------------------------------------------------------
# The official recipe (harma-method.md)
# --------------------------------------------------------------------------------------------
OFFICIAL_COMMON = {
    # 1.2-1.5: one MGA after every block's MLP in both towers, mini-adapter on the text side only
    "model.adapter.kind": "harma",
    "model.adapter.layout": "official",        # 1.5: nothing shared between the towers in the code
    "model.adapter.rank": 128,                 # 1.3 step 1: bottleneck 128 in both towers
    "model.adapter.heads": 8,                  # 1.3 step 2: MHA(128, 8 heads)
    "model.adapter.mini_rank": 64,             # 1.4: 128 -> 64 -> 128
    "model.adapter.mini_heads": 8,             # 1.4 step 2: MHA(64, 8 heads)
    "model.adapter.gate_init": 0.6,            # 1.2 step 3, 1.3 step 5, 1.4 step 4
    "model.adapter.text_padding_mask": False,  # 1.3 step 2 and 7.10: no mask, pads attended
    "model.temperature_init": 0.07,            # 2.2 (a): learnable temp, init 0.07
    "model.train_backbone": False,             # 1.6: every CLIP weight frozen
    "model.backbone.precision": "fp32",        # 3: fp32, no AMP
    "run.seed": 3407,                          # 3: seed 3407 (+ rank)
    "train.batch_size": 428,                   # 3: 214 per GPU x 2 GPUs, losses over the 428
    "train.optimizer.betas": (0.9, 0.98),      # 3: AdamW betas
    "train.optimizer.eps": 1e-8,               # 3
    "train.optimizer.weight_decay": 0.04,      # 3
    "train.optimizer.decay_scalars": True,     # 3 and 7.13: decay on the gates and temp too
    "train.schedule.warmup_fraction": 0.1,     # 3: linear warm-up over the first 10 %
    "train.schedule.min_lr_fraction": 0.0,     # 3: then linear decay to 0
    "train.loss.contrastive_weight": 1.0,      # 2.2: L = L_con + L_trip, weight 1 each
    "train.loss.triplet_weight": 1.0,          # 2.2
    "train.loss.triplet_margin": 0.2,          # 2.2 (b): m = 0.2
    "train.loss.triplet_gamma": 2.0,           # 2.2 (b): gamma = 2
    "train.loss.triplet_same_image": "negative",  # 2.2 (b): idx not used, same image = negative
    "train.loss.triplet_reduction": "sum",     # 2.2 (b): sum over pairs, / 2
    "train.loss.uniformity_weight": 0.0,       # 2.1: the code has no uniformity term
    "train.eval_batch_size": 128,              # 4 step 1: encode in batches of 128
    "data.train_split": "train",               # 6
    "data.val_split": "val",                   # 6
    "data.test_split": "test",                 # 4 and 6: scored on the test galleries
    "data.max_words": 30,                      # 3: pre_caption keeps the first 30 words
    "data.batch_composition": "uniform",       # 3: DistributedSampler(shuffle=True) over pairs
    "data.augment.enabled": True,              # 3: train transform
    "data.augment.crop_scale_min": 0.5,        # 3: RandomResizedCrop scale 0.5-1.0
    "data.augment.hflip": True,                # 3: RandomHorizontalFlip
    "data.augment.randaug_ops": 2,             # 3: RandomAugment N=2
    "data.augment.randaug_magnitude": 7,       # 3: RandomAugment M=7
}
OFFICIAL_VARIANT = {
    # 1.1: LAION-2B ViT-B-32 with exact GELU; GeoRSCLIP = OpenAI architecture, QuickGELU
    "vit": {"model.backbone.arch": "ViT-B-32", "train.optimizer.lr": 4e-4},  # 3: peak lr 4e-4
    "geo": {"model.backbone.arch": "ViT-B-32-quickgelu", "train.optimizer.lr": 4e-6},  # 3: 4e-6
}
OFFICIAL_EPOCHS = {  # 3: epochs
    ("rsitmd", "vit"): 50, ("rsicd", "vit"): 10, ("rsitmd", "geo"): 80, ("rsicd", "geo"): 80,
}
# 1.1: the weights each variant starts from (the file name of the URI you upload them to)
OFFICIAL_WEIGHTS = {"vit": "laion2b", "geo": "RS5M_ViT-B-32_RET-2.pt"}

TRAIN_FILES = {
    "train_rsitmd.yaml": ("rsitmd", "vit"),
    "train_rsicd.yaml": ("rsicd", "vit"),
    "train_rsitmd_geo.yaml": ("rsitmd", "geo"),
    "train_rsicd_geo.yaml": ("rsicd", "geo"),
}

# Fields that are not part of the recipe: where things live, the cluster, logging, the demo.
NOT_RECIPE = (
    "run.name", "run.output_dir", "model.backbone.weights_uri",  # locations (weights: see above)
    "data.root", "data.prepared_uri", "data.max_bad_fraction",
    "data.deterministic",          # the official runs are not reproducible either (3)
    "data.shuffle_buffer_pairs",   # the stream's mixing buffer (how batches reach uniform sampling)
    "data.image_visits",           # tasks per image an epoch (how batches stay uniform at any split size)
    "run.track",                   # experiment tracking (MLflow)
    "train.steps",                 # unused when train.epochs is set
    "train.eval_every",            # local loop only; the Ray path validates once per epoch
    "train.log_every",
    "train.loss.uniformity_t",     # unused: uniformity_weight is 0
    "train.workers.", "train.deepspeed.",
)

# --------------------------------------------------------------------------------------------
# The documented departures: (what the file does instead, words its header line must contain)
# --------------------------------------------------------------------------------------------
# Config fields: path -> the file's value; its header line names the path and both values.
CONFIG_DEPARTURES = {
    "train.batch_size": 432,                # the global batch splits over 2, 3 and 4 workers
    "model.backbone.precision": "bf16",     # bf16 autocast, fp32 master weights
}
# Fixed platform behaviour (no config field): the words its header line must contain.
BEHAVIOUR_DEPARTURES = {
    "model selection": ("best checkpoint selected on val", "not on test"),  # 3: official on test
    "lr schedule": ("lr schedule sized on the real step count", "ceil"),    # 3 and 7.14
}
DEPARTURES = {name: (CONFIG_DEPARTURES, BEHAVIOUR_DEPARTURES) for name in TRAIN_FILES}


def _get(cfg: PlatformConfig, path: str):
    return reduce(getattr, path.split("."), cfg)


def _official(dataset: str, variant: str) -> dict:
    return {**OFFICIAL_COMMON, **OFFICIAL_VARIANT[variant],
            "train.epochs": OFFICIAL_EPOCHS[dataset, variant]}


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.extend(_leaves(value, path + ".") if isinstance(value, dict) else [path])
    return out


def _header(name: str) -> list[str]:
    lines = []
    for line in (JOBS / name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


@pytest.mark.parametrize("name", sorted(TRAIN_FILES))
def test_train_file_is_the_official_recipe_but_for_its_departures(name):
    dataset, variant = TRAIN_FILES[name]
    cfg = load_config(JOBS / name)
    official = _official(dataset, variant)
    departures, _ = DEPARTURES[name]
    assert set(departures) <= set(official), "a departure must name a field of the official table"
    wrong = {}
    for path, value in official.items():
        want = departures.get(path, value)
        got = _get(cfg, path)
        if got != want:
            wrong[path] = {"file": got, "expected": want, "official": value}
    assert not wrong, f"{name} differs from the official recipe without a documented departure: {wrong}"
    # 1.1: the weights the official configs load
    assert OFFICIAL_WEIGHTS[variant] in (cfg.model.backbone.weights_uri or ""), name
    # 1.1: exact GELU for the LAION ViT-B-32, QuickGELU for GeoRSCLIP (the OpenAI builder)
    quick = bool(load_arch_config(cfg.model.backbone.arch).get("quick_gelu", False))
    assert quick is (variant == "geo"), name
    # the train split of the right dataset
    assert (cfg.data.prepared_uri or "").rstrip("/").endswith(dataset), name


@pytest.mark.parametrize("name", sorted(TRAIN_FILES))
def test_every_recipe_field_is_in_the_table(name):
    """A new schema field must be placed in the official table or in NOT_RECIPE (decided, not missed)."""
    dataset, variant = TRAIN_FILES[name]
    raw = load_config(JOBS / name).to_dict()
    known = set(_official(dataset, variant))
    unplaced = [p for s in ("run", "model", "data", "train") for p in _leaves(raw[s], s + ".")
                if p not in known and not any(p == n or (n.endswith(".") and p.startswith(n))
                                              for n in NOT_RECIPE)]
    assert not unplaced, f"recipe fields missing from the official table of this test: {unplaced}"


@pytest.mark.parametrize("name", sorted(TRAIN_FILES))
def test_every_departure_is_stated_in_the_header(name):
    header = _header(name)
    config_departures, behaviour_departures = DEPARTURES[name]
    dataset, variant = TRAIN_FILES[name]
    official = _official(dataset, variant)
    missing = []
    for path, ours in config_departures.items():
        words = (path, str(ours), f"not {official[path]}")
        if not any(all(w in line for w in words) for line in header):
            missing.append(words)
    for words in behaviour_departures.values():
        if not any(all(w in line for w in words) for line in header):
            missing.append(words)
    assert not missing, f"{name}: departures not stated in one header line each: {missing}"
    assert header[0].startswith(f"# harma train --config jobs/{name}"), header[0]


def test_run_directories_do_not_collide():
    dirs = [f"{c.run.output_dir.rstrip('/')}/{c.run.name}"
            for c in (load_config(JOBS / n) for n in sorted(TRAIN_FILES))]
    assert len(set(dirs)) == len(dirs), dirs


def test_rsitmd_eval_index_and_serve_use_the_best_checkpoint_of_the_train_job():
    train = load_config(JOBS / "train_rsitmd.yaml")
    best = f"{train.run.output_dir.rstrip('/')}/{train.run.name}/best"
    ev = load_config(JOBS / "eval_rsitmd.yaml").eval
    index = load_config(JOBS / "index_rsitmd.yaml").index
    assert ev is not None and index is not None
    assert ev.checkpoint_uri == best
    assert index.checkpoint_uri == best
    assert ev.prepared_uri == index.corpus_uri == train.data.prepared_uri
    app = yaml.safe_load((REPO / "serve_configs" / "gpu.yaml").read_text())["applications"][0]
    assert app["args"]["checkpoint_uri"] == best
    assert app["args"]["index_uri"] == index.output_uri
    for deployment in app["deployments"]:
        assert deployment.get("user_config", {}).get("index_uri", index.output_uri) == index.output_uri
    assert best in "\n".join(_header("train_rsitmd.yaml"))
