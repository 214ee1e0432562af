"""Retrieval metrics (R@1/5/10 both ways, mR) from a similarity matrix; pure numpy.

    from harma.eval import retrieval_metrics
    metrics = retrieval_metrics(sim, caption_image)   # sim: (images, captions)

Protocol (harma-method.md section 4): image -> text ranks an image by the best position of any of
its captions among all captions; text -> image ranks a caption by the position of its one image.
R@K is the percentage of queries ranked within the top K; mR is the mean of the six recalls.

Tied scores (identical captions give identical text embeddings) need a rule; every result names the
one it used under "protocol":

* `ties="pessimistic"` (the default, "pessimistic ties"): a relevant item tied with irrelevant
  ones is ranked after all of them, so a model gains nothing from ties (a constant similarity
  scores 0 at K < gallery size). Deterministic and independent of any sort algorithm.
* `ties="optimistic"` ("optimistic ties"): ranked before them (an upper bound).
* `ties="official"` ("official ties (np.argsort reversed)"): the paper code's ranking, numpy's
  default (quicksort, not stable) `np.argsort(row)[::-1]` of each image's row (image -> text) and
  of each caption's column (text -> image), in the matrix's own float dtype. Tied items come in
  whatever order that sort leaves them, which depends on the numpy build and CPU as it did for the
  paper; it always lies between the optimistic and the pessimistic figure.

`per_class_metrics` breaks the figures down by scene class; `evaluation_report` is everything
`harma eval` writes (both protocols, overall and per class).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mr")
KS = (1, 5, 10)
PROTOCOLS = {
    "pessimistic": "pessimistic ties",
    "optimistic": "optimistic ties",
    "official": "official ties (np.argsort reversed)",
}


def _ranks_i2t(sim: np.ndarray, caption_image: np.ndarray, ties: str) -> np.ndarray:
    n_images = sim.shape[0]
    relevant = caption_image[None, :] == np.arange(n_images)[:, None]  # (I, C)
    best = np.where(relevant, sim, -np.inf).max(axis=1)  # best relevant score per image
    irrelevant = ~relevant
    if ties == "pessimistic":
        ahead = (sim >= best[:, None]) & irrelevant
    else:
        ahead = (sim > best[:, None]) & irrelevant
    return ahead.sum(axis=1)


def _ranks_t2i(sim: np.ndarray, caption_image: np.ndarray, ties: str) -> np.ndarray:
    n_captions = sim.shape[1]
    target = sim[caption_image, np.arange(n_captions)]  # (C,)
    others = np.ones_like(sim, dtype=bool)
    others[caption_image, np.arange(n_captions)] = False
    if ties == "pessimistic":
        ahead = (sim >= target[None, :]) & others
    else:
        ahead = (sim > target[None, :]) & others
    return ahead.sum(axis=0)


def _positions_reversed_argsort(scores: np.ndarray) -> np.ndarray:
    """pos[r, j] = index of item j in `np.argsort(scores[r])[::-1]` (the paper code's order)."""
    order = np.argsort(scores, axis=1)[:, ::-1]  # default kind: quicksort, as the paper code
    pos = np.empty_like(order)
    pos[np.arange(order.shape[0])[:, None], order] = np.arange(order.shape[1])[None, :]
    return pos


def _ranks_official(sim: np.ndarray, caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_images, n_captions = sim.shape
    pos = _positions_reversed_argsort(sim)  # (I, C): each image's row, as `itm_eval` sorts it
    relevant = caption_image[None, :] == np.arange(n_images)[:, None]
    i2t = np.where(relevant, pos, n_captions).min(axis=1)
    pos_t = _positions_reversed_argsort(np.ascontiguousarray(sim.T))  # (C, I): each caption's column
    t2i = pos_t[np.arange(n_captions), caption_image]
    return i2t, t2i


def retrieval_ranks(
    sim: np.ndarray | Sequence[Sequence[float]],
    caption_image: np.ndarray | Sequence[int],
    ties: str = "pessimistic",
) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of every query: (image -> text ranks (n_images,), text -> image ranks (n_captions,)).

    An image's rank is the number of captions ranked before its best-placed own caption; a
    caption's, the number of images ranked before its image. Arguments and errors as
    `retrieval_metrics`.
    """
    raw = np.asarray(sim)
    sim64 = np.asarray(raw, dtype=np.float64)
    caption_image = np.asarray(caption_image)
    _check(sim64, caption_image, ties)
    if ties == "official":
        sort_in = raw if np.issubdtype(raw.dtype, np.floating) else sim64  # the caller's dtype
        return _ranks_official(sort_in, caption_image)
    return _ranks_i2t(sim64, caption_image, ties), _ranks_t2i(sim64, caption_image, ties)


def _check(sim: np.ndarray, caption_image: np.ndarray, ties: str) -> None:
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"sim must be a non-empty (images, captions) matrix, got shape {sim.shape}")
    if caption_image.shape != (sim.shape[1],):
        raise ValueError(
            f"caption_image must have one entry per caption ({sim.shape[1]}), "
            f"got shape {caption_image.shape}"
        )
    if not np.issubdtype(caption_image.dtype, np.integer):
        raise ValueError(f"caption_image must hold integer image indices, got {caption_image.dtype}")
    if caption_image.min() < 0 or caption_image.max() >= sim.shape[0]:
        raise ValueError(f"caption_image values must lie in [0, {sim.shape[0]})")
    if not np.isfinite(sim).all():
        raise ValueError("sim holds NaN or infinite values")
    without = np.setdiff1d(np.arange(sim.shape[0]), caption_image)
    if without.size:
        raise ValueError(f"{without.size} image(s) have no caption, e.g. index {int(without[0])}")
    if ties not in PROTOCOLS:
        raise ValueError(f"ties must be one of {', '.join(map(repr, PROTOCOLS))}, got {ties!r}")


def _recalls(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    out = {f"i2t_r{k}": 100.0 * float(np.mean(i2t < k)) for k in KS}
    out.update({f"t2i_r{k}": 100.0 * float(np.mean(t2i < k)) for k in KS})
    out["mr"] = float(np.mean([out[key] for key in METRIC_KEYS[:-1]]))
    return out


def retrieval_metrics(
    sim: np.ndarray | Sequence[Sequence[float]],
    caption_image: np.ndarray | Sequence[int],
    ties: str = "pessimistic",
) -> dict[str, float | str]:
    """Recall@{1,5,10} image->text and text->image, and their mean, in percent.

    Args:
        sim: (n_images, n_captions) similarities, higher is closer.
        caption_image: (n_captions,) index of each caption's image; any number of captions per
            image, but every image needs at least one.
        ties: "pessimistic" (default), "optimistic" or "official", see the module docstring.
    Returns:
        {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mr"}: floats in [0, 100],
        and "protocol": the tie rule in words (`PROTOCOLS[ties]`).
    Raises:
        ValueError: wrong shapes, non-finite scores, ids out of range, an image with no caption,
            or an unknown `ties`.
    """
    i2t, t2i = retrieval_ranks(sim, caption_image, ties)
    return {**_recalls(i2t, t2i), "protocol": PROTOCOLS[ties]}


def per_class_metrics(
    sim: np.ndarray | Sequence[Sequence[float]],
    caption_image: np.ndarray | Sequence[int],
    image_labels: Sequence[str | None],
    ties: str = "pessimistic",
) -> dict:
    """R@1/5/10 image->text and text->image and mR per scene class, in percent.

    A class's figures are those of its queries only, each ranked against the WHOLE gallery (every
    caption, resp. every image, of every class), exactly as in `retrieval_metrics`: image -> text
    R@K = % of the class's images whose best own caption ranks within the top K of all captions;
    text -> image R@K = % of the captions of the class's images whose image ranks within the top K
    of all images; mR = mean of the six. So a class's figures, weighted by its query counts,
    average to the overall ones. Images labelled None are no class's queries but stay in the gallery.

    Args:
        sim, caption_image, ties: as `retrieval_metrics`.
        image_labels: (n_images,) scene class of each image (None: unlabelled).
    Returns:
        {"protocol": PROTOCOLS[ties], "unlabelled_images": int, "classes": {label: {"images": n,
        "captions": m, "i2t_r1", ..., "mr"}}} with classes in name order.
    """
    labels = list(image_labels)
    i2t, t2i = retrieval_ranks(sim, caption_image, ties)
    if len(labels) != len(i2t):
        raise ValueError(f"image_labels must have one entry per image ({len(i2t)}), got {len(labels)}")
    caption_image = np.asarray(caption_image)
    names = np.array(["" if x is None else str(x) for x in labels], dtype=object)
    known = np.array([x is not None for x in labels], dtype=bool)
    classes = {}
    for name in sorted(set(names[known])):
        images = known & (names == name)
        captions = images[caption_image]
        classes[name] = {"images": int(images.sum()), "captions": int(captions.sum()),
                         **_recalls(i2t[images], t2i[captions])}
    return {"protocol": PROTOCOLS[ties], "unlabelled_images": int((~known).sum()), "classes": classes}


_NUMBERED = re.compile(r"^([A-Za-z]+(?:[ _-][A-Za-z]+)*)[_-]?\d+$")


def label_from_file_name(image_key: str) -> str | None:
    """The scene class a numbered file name spells, else None: `test/park_217.tif` -> "park".

    RSITMD/RSICD test annotations have no label_name, but their images are named
    `<class>_<number>`; unnamed ones (`00578.jpg`) get None.
    """
    stem = image_key.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    match = _NUMBERED.match(stem)
    return match.group(1).lower() if match else None


def resolve_labels(
    label_names: Sequence[str | None] | None, image_keys: Sequence[str] | None, n_images: int
) -> tuple[list[str | None], dict[str, int]]:
    """Each image's class: its annotation label_name, else `label_from_file_name` of its key.

    Returns the labels and how many came from where: {"label_name", "file_name", "none"}.
    """
    names = list(label_names) if label_names is not None else [None] * n_images
    keys = list(image_keys) if image_keys is not None else [None] * n_images
    if len(names) != n_images or len(keys) != n_images:
        raise ValueError(f"labels and image keys must have one entry per image ({n_images})")
    out, counts = [], {"label_name": 0, "file_name": 0, "none": 0}
    for name, key in zip(names, keys, strict=True):
        if name not in (None, ""):
            out.append(str(name))
            counts["label_name"] += 1
            continue
        derived = label_from_file_name(key) if key else None
        out.append(derived)
        counts["file_name" if derived else "none"] += 1
    return out, counts


def evaluation_report(
    sim: np.ndarray | Sequence[Sequence[float]],
    caption_image: np.ndarray | Sequence[int],
    label_names: Sequence[str | None] | None = None,
    image_keys: Sequence[str] | None = None,
) -> dict:
    """Everything `harma eval` records: both protocols, overall and per scene class.

    Returns {"metrics": retrieval_metrics (pessimistic ties, the default), "metrics_official":
    retrieval_metrics(ties="official"), "per_class": {"pessimistic": per_class_metrics,
    "official": per_class_metrics(ties="official"), "label_sources": resolve_labels' counts}}.
    "per_class" is None when no image has a class (no label_name and no `<class>_<n>` file name).
    """
    sim = np.asarray(sim)
    report = {"metrics": retrieval_metrics(sim, caption_image),
              "metrics_official": retrieval_metrics(sim, caption_image, ties="official"),
              "per_class": None}
    labels, sources = resolve_labels(label_names, image_keys, sim.shape[0])
    if sources["none"] < len(labels):
        report["per_class"] = {"pessimistic": per_class_metrics(sim, caption_image, labels),
                               "official": per_class_metrics(sim, caption_image, labels, ties="official"),
                               "label_sources": sources}
    return report


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A fixed-width table: one row per named metrics dict, columns R@K both ways and mR."""
    header = f"{'':<18}" + "".join(f"{h:>9}" for h in ("I2T R@1", "R@5", "R@10", "T2I R@1", "R@5", "R@10", "mR"))
    lines = [header]
    for name, m in rows.items():
        lines.append(f"{name:<18}" + "".join(f"{m[key]:>9.2f}" for key in METRIC_KEYS))
    return "\n".join(lines)


def format_class_table(per_class: dict) -> str:
    """A short table of `evaluation_report(...)["per_class"]`: one row per class, R@1 and mR both ways."""
    pess, off = per_class["pessimistic"]["classes"], per_class["official"]["classes"]
    cols = f"{'I2T R@1':>9}{'T2I R@1':>9}{'mR':>8}"
    lines = [f"{'':<36} |{'pessimistic ties':^26} |{'official ties':^26}".rstrip(),
             f"{'class':<22}{'images':>7}{'capts':>7} |{cols} |{cols}"]
    for name, p in pess.items():
        o = off[name]
        lines.append(f"{name[:21]:<22}{p['images']:>7}{p['captions']:>7} |{p['i2t_r1']:>9.2f}{p['t2i_r1']:>9.2f}"
                     f"{p['mr']:>8.2f} |{o['i2t_r1']:>9.2f}{o['t2i_r1']:>9.2f}{o['mr']:>8.2f}")
    return "\n".join(lines)
