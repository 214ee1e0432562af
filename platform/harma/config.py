"""THE configuration schema of the platform: one typed, frozen, validated object.

A job is a YAML file plus `a.b=c` overrides::

    harma config validate jobs/demo.yaml
    harma config show jobs/demo.yaml train.optimizer.lr=3e-4 model.adapter.rank=32

`load_config(path, overrides)` reads the YAML, applies the overrides to the raw dict (values parsed
as YAML scalars, so `[1,2]`, `null` and `1e-4` work), rejects unknown dotted paths with a
closest-match hint, and validates into `PlatformConfig`. Every error names the offending dotted
path. This module imports only pydantic, yaml and the standard library, so validating a config
starts instantly.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the dotted path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
class RunConfig(_Section):
    """Identity of a run and where its artifacts go."""

    name: str = Field("harma-run", description="Run name: lower-case letters, digits and '-'.")
    output_dir: str = Field(
        "runs", description="Local folder or s3:// prefix; the run writes into output_dir/name."
    )
    seed: int = Field(3407, description="Seeds adapters, data order and augmentation.")
    track: bool = Field(
        True, description="Log the run to MLflow: MLFLOW_TRACKING_URI, else <output_dir>/<name>/mlruns "
        "(harma.tracking).")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", value):
            raise ValueError("must match [a-z0-9][a-z0-9-]* (lower-case letters, digits, '-')")
        return value


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
class BackboneConfig(_Section):
    """The frozen open_clip backbone."""

    arch: str = Field(
        "ViT-B-32",
        description="An open_clip model name (ViT-B-32, ViT-B-32-quickgelu, ...), a bundled "
        "architecture (harma-tiny) or a path to an open_clip architecture JSON.",
    )
    weights_uri: str | None = Field(
        None,
        description="None = random init; else a local path or s3:// URI of an open_clip state "
        "dict (.safetensors/.pt/.bin) or an OpenAI/GeoRSCLIP-style .pt.",
    )
    precision: Literal["fp32", "bf16"] = "fp32"


class AdapterConfig(_Section):
    """HarMA adapters (MGA after each block's MLP, with the mini shared adapter)."""

    kind: Literal["harma", "none"] = Field(
        "harma", description="'none' trains no adapters (the frozen backbone, or full training)."
    )
    layout: Literal["official", "paper"] = Field(
        "official",
        description="'official': the paper code's structure (mini-adapter on the text side only);"
        " 'paper': the layer-l mini-adapter is shared by the image and the text adapter.",
    )
    rank: int = Field(128, ge=1, description="Adapter bottleneck width.")
    heads: int = Field(8, ge=1, description="Heads of the adapter's attention.")
    mini_rank: int = Field(64, ge=1, description="Mini (shared) adapter width.")
    mini_heads: int = Field(8, ge=1)
    gate_init: float = Field(0.6, description="Initial value of every gate logit.")
    text_padding_mask: bool = Field(
        True,
        description="Text-side adapter attention ignores padding; false reproduces the official "
        "unmasked behaviour.",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> AdapterConfig:
        if self.rank % self.heads:
            raise ValueError(f"rank ({self.rank}) must be divisible by heads ({self.heads})")
        if self.mini_rank % self.mini_heads:
            raise ValueError(
                f"mini_rank ({self.mini_rank}) must be divisible by mini_heads ({self.mini_heads})"
            )
        return self


class ModelConfig(_Section):
    backbone: BackboneConfig = BackboneConfig()
    adapter: AdapterConfig = AdapterConfig()
    temperature_init: float = Field(0.07, gt=0, description="Initial contrastive temperature.")
    train_backbone: bool = Field(
        False, description="Train every backbone weight too (used to pre-train a base model)."
    )


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
class AugmentConfig(_Section):
    """Training augmentation (harma-method.md section 3)."""

    enabled: bool = True
    crop_scale_min: float = Field(0.5, gt=0, le=1)
    hflip: bool = True
    randaug_ops: int = Field(2, ge=0, description="RandomAugment N (ops per image).")
    randaug_magnitude: int = Field(7, ge=0, le=10, description="RandomAugment M.")


class DataConfig(_Section):
    """Where a dataset in the RSITMD/RSICD layout lives and how samples are made."""

    root: str = Field("data/synth", description="Dataset folder: annotations/ + images/.")
    prepared_uri: str | None = Field(
        None,
        description="Prepared Parquet shards (`harma data prepare --out`), local or s3://; the "
        "Ray path (`harma train`) streams from here.",
    )
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="Stop when more than this fraction of images is unusable."
    )
    deterministic: bool = Field(
        False,
        description="Ray path: seed shard order, in-shard order, shuffle buffer and augmentation "
        "from run.seed (reproducible runs; an image then gets the same augmentation and in-shard "
        "place every epoch).",
    )
    batch_composition: Literal["uniform", "image_grouped"] = Field(
        "uniform",
        description="'uniform': batches as uniform sampling of (image, caption) pairs makes them, as "
        "the paper code does (another caption of a sample's own image is rarely in its batch); "
        "'image_grouped': an image's captions are emitted together and often share a batch.",
    )
    shuffle_buffer_pairs: int = Field(
        2048, ge=0,
        description="Ray path: each worker draws its batches at random from this many streamed "
        "pairs (at least 4 micro-batches), mixing the stream tasks' outputs pair by pair; it "
        "holds that many decoded pairs (2048 x 224 px: ~300 MB).",
    )
    image_visits: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto",
        description="Ray path: how many stream tasks of an epoch take a part of each image's "
        "captions (each task decodes the image again). 1: one task emits all of an image's pairs, "
        "uniform only while a worker's shuffle buffer holds the split; the number of captions: one "
        "caption an image per task, so an image's captions reach the workers at independent times "
        "and batches stay uniform at any split size, at one decode and one shard read per caption. "
        "'auto': 1 when the train split's pairs fit in shuffle_buffer_pairs, else the most "
        "captions an image has.",
    )
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    max_words: int = Field(30, ge=1, description="Captions are cut to this many words.")
    augment: AugmentConfig = AugmentConfig()


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
class OptimizerConfig(_Section):
    lr: float = Field(4e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.04, ge=0)
    decay_scalars: bool = Field(
        True, description="Apply weight decay to gates and temperature (as the paper code does)."
    )


class ScheduleConfig(_Section):
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    min_lr_fraction: float = Field(0.0, ge=0, le=1, description="Linear decay ends here.")


class LossConfig(_Section):
    """L = w_c * L_contrastive + w_t * L_triplet + w_u * L_uniformity."""

    contrastive_weight: float = Field(1.0, ge=0)
    triplet_weight: float = Field(1.0, ge=0)
    triplet_margin: float = Field(0.2, ge=0)
    triplet_gamma: float = Field(2.0, ge=0)
    triplet_same_image: Literal["negative", "positive"] = Field(
        "negative",
        description="How the triplet loss treats other captions of the same image: 'negative' "
        "as the paper code does, 'positive' excludes them from the negatives.",
    )
    triplet_reduction: Literal["sum", "mean"] = Field(
        "sum", description="'sum' as the paper code (scales with B^2), 'mean' over pairs."
    )
    uniformity_weight: float = Field(0.0, ge=0)
    uniformity_t: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _some_loss(self) -> LossConfig:
        if self.contrastive_weight + self.triplet_weight + self.uniformity_weight <= 0:
            raise ValueError("at least one loss weight must be positive")
        return self


class DeepSpeedConfig(_Section):
    """How the DeepSpeed config is derived (no hand-written DeepSpeed JSON anywhere)."""

    zero_stage: Literal[0, 1, 2] = 0
    shm_comm_op: bool = Field(
        False, description="Build DeepSpeed's CPU shared-memory comm op (a ~1 min JIT compile; "
        "used only for inference all-reduce)."
    )


class WorkersConfig(_Section):
    """Ray Train workers: a fixed count (min == max) or an elastic range."""

    min: int = Field(1, ge=1)
    max: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0, description="Logical CPUs reserved per worker.")
    use_gpu: bool = False
    max_failures: int = Field(3, ge=-1, description="Restarts from the last checkpoint; -1 = no limit.")
    resize_interval_s: float = Field(60.0, gt=0, description="How often an elastic run looks for more workers.")

    @model_validator(mode="after")
    def _range(self) -> WorkersConfig:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class TrainConfig(_Section):
    steps: int = Field(200, ge=1, description="Optimizer steps (local loop; Ray path when epochs unset).")
    epochs: int | None = Field(None, ge=1, description="Ray path: passes over the train split.")
    batch_size: int = Field(64, ge=2, description="Global batch size (image-caption pairs).")
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    loss: LossConfig = LossConfig()
    eval_every: int = Field(50, ge=1, description="Validate every this many steps.")
    log_every: int = Field(10, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    workers: WorkersConfig = WorkersConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainConfig:
        uneven = [n for n in range(self.workers.min, self.workers.max + 1) if self.batch_size % n]
        if uneven:
            raise ValueError(
                f"batch_size {self.batch_size} (the global batch) must split evenly over every worker "
                f"count in workers.min..max; it does not for {uneven}"
            )
        return self


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------
class DemoConfig(_Section):
    """`harma demo`: synthesise data, pre-train a tiny base model, HarMA-adapt it, evaluate."""

    images: int = Field(600, ge=20, description="Downstream images (train+val+test).")
    pretrain_images: int = Field(1200, ge=0, description="Images of the pre-training split.")
    pretrain_steps: int = Field(300, ge=0)
    pretrain_lr: float = Field(1e-3, gt=0)
    pretrain_batch_size: int = Field(128, ge=2)
    pretrain_loss: LossConfig = Field(
        default_factory=LossConfig, description="Objective of the full pre-training stage."
    )


# --------------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------------
SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class SchedulerConfig(_Section):
    kind: Literal["asha", "fifo"] = Field("asha", description="asha stops weak trials early.")
    grace_period: int = Field(1, ge=1, description="Epochs every trial runs before it can be stopped.")
    reduction_factor: int = Field(2, ge=2)


class TuneConfig(_Section):
    """`harma tune`: a search space over any config path, early stopping on val mR."""

    metric: str = "val_mr"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1, description="Samples of the space (grids are crossed with it).")
    max_concurrent_trials: int = Field(1, ge=1)
    trial_cpus: float = Field(0.01, gt=0, description="CPUs of a trial's driver; workers ask separately.")
    scheduler: SchedulerConfig = SchedulerConfig()
    search_space: dict[str, dict[str, list]] = Field(
        default_factory=dict,
        description="dotted.path -> {grid|choice: [values]} or {uniform|loguniform|randint: [low, high]}",
    )

    @field_validator("search_space")
    @classmethod
    def _check_space(cls, space: dict[str, dict[str, list]]) -> dict[str, dict[str, list]]:
        if not space:
            raise ValueError("search_space is empty")
        for path, spec in space.items():
            if path.split(".")[0] in ("tune", "index", "eval") or path in ("run.name", "run.output_dir"):
                raise ValueError(f"{path}: this path cannot be searched")
            check_path(path)
            if len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
                raise ValueError(f"{path}: give exactly one of {', '.join(SPACE_KINDS)}, got {list(spec)}")
            kind, values = next(iter(spec.items()))
            if not values:
                raise ValueError(f"{path}: {kind} needs values")
            if kind in ("uniform", "loguniform", "randint"):
                if len(values) != 2 or not values[0] < values[1]:
                    raise ValueError(f"{path}: {kind} needs [low, high] with low < high, got {values}")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"{path}: loguniform needs a positive low bound, got {values[0]}")
        return space


# --------------------------------------------------------------------------------------------
# index
# --------------------------------------------------------------------------------------------
class AnnConfig(_Section):
    """Numbers of the approximate index (`index.ann`, harma.index.ann); 0 = chosen by rule."""

    memory_budget_bytes: int = Field(
        8 << 30, ge=1, description="RAM a replica may give the vectors: `auto` scans exactly only while "
        "float32 vectors fit, and refuses an ivf_pq index whose codes do not.")
    nlist: int = Field(0, ge=0, description="IVF cells (0: the power of two nearest 2 sqrt(N)).")
    nprobe: int = Field(0, ge=0, description="IVF cells a query scans (0: max(8, nlist / 256)).")
    pq_m: int = Field(0, ge=0, description="ivf_pq bytes a vector (0: embedding size / 8).")
    hnsw_m: int = Field(32, ge=4, description="hnsw links a vector.")
    ef_search: int = Field(0, ge=0, description="hnsw candidate list a query (0: 256).")
    rerank: int = Field(50, ge=1, description="Candidates re-scored exactly from the fp16 vectors: rerank x k.")
    target_recall: float | None = Field(
        0.95, gt=0, le=1, description="The build raises nprobe (IVF) or ef_search (HNSW), doubling, until "
        "queries find this share of their exact top 10 (caption queries of the index's captions, else its "
        "images; at most 200, measured on the first shard); the manifest's `ann.tuned` records it. null: "
        "the planned values as they are.")
    train_rows: int = Field(
        0, ge=0, description="IVF: vectors the cells are trained on (0: 64 a cell, at most 262,144), a sample "
        "of the corpus streamed through the embedding actors before the whole is embedded.")


class GeoIndexConfig(_Section):
    """How a GeoTIFF scene archive (`index.corpus_format: geotiff`) is cut into tiles."""

    tile_size: int = Field(256, ge=16, description="Tile side in pixels (native pixels, or at target_gsd).")
    tile_stride: int | None = Field(
        128, ge=1, description="Pixels between tile origins (<= tile_size; less overlaps tiles, so an "
        "object on a tile edge is whole in a neighbour); null = tile_size.")
    target_gsd: float | None = Field(
        None, gt=0, description="Metres per pixel tiles are resampled to (null: the scene's own).")
    preset: Literal["generic", "sentinel2_l2a", "naip"] = Field(
        "generic", description="Fixed band-to-RGB mapping (harma.geo.radiometry); never a per-scene stretch.")
    max_nodata_fraction: float = Field(
        0.5, ge=0, le=1, description="Tiles with more nodata than this are skipped and counted.")
    max_bad_fraction: float = Field(
        0.1, ge=0, le=1, description="Stop the build when more than this fraction of scenes is unreadable.")
    windows_per_task: int | None = Field(
        None, ge=1, description="Tiles one read task takes from a scene (it opens the scene once; "
        "overlapping tiles on either side of a task boundary are read twice, and Ray Data leaves a "
        "CPU idle ~0.2 s between tasks, so fewer, larger tasks read more). null: the archive's tiles "
        "over 4 tasks a cluster CPU, 128 to 2,048 a task (harma.geo.corpus.auto_unit_windows).")
    tiles_per_output: int = Field(
        64, ge=1, description="Tiles a read task hands on at a time (a Ray Data block; the embedding "
        "actors take 64 a batch). Ray Data's cost per block is the same however many tiles it holds: "
        "64 cut a read task's CPU a tile 2.65-3.06 -> 2.25-2.44 ms against 16 (benchmarks/geo_tiles.py).")

    @model_validator(mode="after")
    def _stride_within_tile(self) -> GeoIndexConfig:
        if self.tile_stride is not None and self.tile_stride > self.tile_size:
            raise ValueError(f"tile_stride {self.tile_stride} > tile_size {self.tile_size} would leave gaps")
        return self


class IndexConfig(_Section):
    """`harma index build`: embed an image corpus (and its captions) with a trained checkpoint."""

    checkpoint_uri: str = Field(description="Trained checkpoint folder or s3:// prefix.")
    corpus_uri: str = Field(
        description="Prepared Parquet shards (`harma data prepare --out`); with corpus_format "
        "'images', a folder/s3:// prefix of image files; with 'geotiff', a STAC ItemCollection "
        "(.json) or a folder/s3:// prefix of GeoTIFF scenes.")
    corpus_format: Literal["prepared", "images", "geotiff"] = "prepared"
    geo: GeoIndexConfig = GeoIndexConfig()
    ann: Literal["auto", "exact", "hnsw", "ivf_flat", "ivf_pq"] = Field(
        "auto", description="Image search: exact scan, or a FAISS index re-ranked exactly; auto: exact "
        "under 50,000 images (within ann_params.memory_budget_bytes), ivf_pq beyond (harma.index.ann).")
    ann_params: AnnConfig = AnnConfig()
    splits: list[str] = Field(
        default_factory=lambda: ["test"], description="Prepared splits to index (prepared corpus).")
    output_uri: str = Field(description="Where the index goes (folder or s3:// prefix).")
    captions: bool = Field(
        True, description="Also index the corpus captions, for image -> text search (prepared corpus).")
    image_extensions: list[str] = Field(
        default_factory=lambda: [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"],
        description="Files taken from an 'images' corpus.")
    batch_size: int = Field(64, ge=1, description="Images per inference batch.")
    thumbnail_size: int = Field(
        128, ge=0, description="Longest side of the JPEG thumbnails kept in the index for the web "
        "page (0 = none).")
    max_shard_bytes: int | None = Field(
        None, ge=1, description="Most RAM one serving replica may hold for its images' vectors (float32 of an "
        "exact index, the FAISS structure of an approximate one); a bigger index is written as shards of at "
        "most this, each served by its own deployment (harma.index.shards). null: one shard, whatever its size.")
    use_gpu: bool = Field(False, description="One GPU per embedding actor.")
    actors: int = Field(1, ge=1, description="Embedding actors (each loads the model once).")
    cpus_per_actor: float = Field(1.0, gt=0)
    trace_encoders: bool = Field(
        True, description="Embed with TorchScript graphs of the towers, checked against the eager "
        "model when each actor starts (see harma.serve.traced).")
    precision: Literal["validated", "fp32", "bf16"] = Field(
        "validated", description="Weights the corpus is embedded with: the numerics that validated the "
        "checkpoint (its numerics.json), or explicitly bf16/fp32; an index of other numerics than the "
        "validated ones records their measured cost (mR, top-10 overlap) in its manifest.")

    @field_validator("splits")
    @classmethod
    def _some_split(cls, splits: list[str]) -> list[str]:
        if not splits:
            raise ValueError("give at least one split")
        return splits


class EvalConfig(_Section):
    """`harma eval --config`: score a checkpoint on a prepared split (R@1/5/10 both ways, mR)."""

    checkpoint_uri: str = Field(description="Checkpoint folder or s3:// prefix.")
    prepared_uri: str | None = Field(None, description="Prepared shards (default: the checkpoint's data.prepared_uri).")
    split: str = "test"
    out: str | None = Field(None, description="JSON result (default: <checkpoint>/eval_<split>.json).")


# --------------------------------------------------------------------------------------------
# the whole thing
# --------------------------------------------------------------------------------------------
class PlatformConfig(_Section):
    """The resolved configuration of one job."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    demo: DemoConfig = DemoConfig()
    tune: TuneConfig | None = None
    index: IndexConfig | None = None
    eval: EvalConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict; `PlatformConfig.model_validate(d) == self`."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> PlatformConfig:
        """A new config with dotted-path overrides applied (`{"a.b": 1}` or `["a.b=1"]`)."""
        return _validate(apply_overrides(self.to_dict(), overrides), source="overrides")


# --------------------------------------------------------------------------------------------
# loading and overrides
# --------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, Any]:
    """`"a.b=c"` -> `("a.b", value)`, the value parsed as a YAML scalar/flow value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.path=value")
    path, raw = text.split("=", 1)
    path = path.strip()
    if not path or any(not part for part in path.split(".")):
        raise ConfigError(f"override {text!r} has an empty path component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {path}: cannot parse value {raw!r}: {err}") from err
    return path, value


def _known_children(model: type[BaseModel]) -> dict[str, Any]:
    return {name: field.annotation for name, field in model.model_fields.items()}


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The section class of a field annotation (`X` or `X | None`), or None for plain values."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def check_path(path: str, model: type[BaseModel] = None) -> None:  # type: ignore[assignment]
    """Raise ConfigError unless `path` names a field of the schema (with a closest-match hint)."""
    model = model or PlatformConfig
    parts = path.split(".")
    for depth, part in enumerate(parts):
        children = _known_children(model)
        if part not in children:
            where = ".".join(parts[:depth]) or "<root>"
            hint = difflib.get_close_matches(part, list(children), n=1)
            suggestion = f"; did you mean {'.'.join(parts[:depth] + hint)!r}?" if hint else ""
            raise ConfigError(
                f"unknown config key {path!r}: {where} has no field {part!r}{suggestion} "
                f"(known: {', '.join(sorted(children))})"
            )
        sub = _section_type(children[part])
        if depth < len(parts) - 1:
            if sub is None:
                raise ConfigError(
                    f"unknown config key {path!r}: {'.'.join(parts[: depth + 1])} is a value, "
                    "not a section"
                )
            model = sub


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Apply dotted-path overrides to a raw config dict (returns a new dict)."""
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    out = _deep_copy(raw)
    for path, value in items:
        check_path(path)
        node = out
        parts = path.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw


def _validate(raw: dict[str, Any], source: str) -> PlatformConfig:
    try:
        return PlatformConfig.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            path = ".".join(str(p) for p in e["loc"]) or "<root>"
            if e["type"] == "extra_forbidden":
                try:
                    check_path(path)
                except ConfigError as hint:
                    lines.append(f"  {hint}")
                    continue
            shown = e["type"] != "extra_forbidden" and not isinstance(e["input"], dict)
            got = f" (got {e['input']!r})" if shown else ""
            lines.append(f"  {path}: {e['msg']}{got}")
        raise ConfigError(f"invalid config in {source}:\n" + "\n".join(lines)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PlatformConfig:
    """Read a YAML job file (or start from defaults when `path` is None), apply overrides, validate.

    Raises:
        ConfigError: unreadable file, unknown key or wrong type; the message names the dotted path.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " + overrides"
    return _validate(raw, source)
