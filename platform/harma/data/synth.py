"""A generated aerial dataset in the RSITMD layout: top-down scenes with five captions each.

    harma data synth --out data/synth --images 600 --seed 0 [--pretrain-images 1200]

Each scene has a land-cover background (farmland, forest, desert, grassland, urban, sea), an
optional river and road, and a group of objects of one kind (buildings, storage tanks, ponds,
planes, ships, fields, trees) with a count, a colour, a size and a position. Five captions per image
mention different subsets of these attributes in varied wording, so retrieval is learnable but not
trivial: many scenes share a kind and a background and differ only in count, colour or position.

Written (local folder or s3:// prefix):

    annotations/{train,val,test}.json   train: one entry per caption; val/test: one per image
    annotations/pretrain.json           optional: coarse captions (kind and background only), for
                                        pre-training a base model before adaptation
    images/<split>/<split>_00000.png
    dataset.json                        counts, seed and generator version

Generation is deterministic for a seed: image i of split s depends only on (seed, s, i).
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from harma import storage

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3, "pretrain": 4}

BACKGROUNDS = {
    "farmland": ((126, 160, 70), (196, 178, 92)),
    "forest": ((34, 82, 38), (52, 104, 48)),
    "desert": ((214, 190, 140), (200, 172, 120)),
    "grassland": ((120, 176, 88), (140, 190, 100)),
    "urban": ((128, 128, 128), (150, 148, 144)),
    "sea": ((30, 70, 140), (40, 86, 160)),
}
KINDS = ("buildings", "storage tanks", "ponds", "planes", "ships", "fields", "trees")
SINGULAR = {
    "buildings": "building", "storage tanks": "storage tank", "ponds": "pond", "planes": "plane",
    "ships": "ship", "fields": "field", "trees": "tree",
}
COLOURS = {
    "red": (200, 40, 40), "white": (240, 240, 240), "blue": (40, 80, 220),
    "yellow": (235, 205, 40), "black": (25, 25, 25), "orange": (240, 140, 30),
}
# Kinds whose colour is fixed by nature; captions never mention a colour for them.
NATURAL_COLOUR = {"ponds": (60, 110, 190), "trees": (20, 70, 25), "fields": None}
POSITIONS = {
    "top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72), "center": (0.5, 0.5),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass(frozen=True)
class Scene:
    background: str
    kind: str
    count: int
    colour: str | None
    size: str
    position: str
    river: bool
    road: bool


def sample_scene(rng: np.random.Generator) -> Scene:
    kind = KINDS[rng.integers(len(KINDS))]
    backgrounds = ["sea"] if kind == "ships" else [b for b in BACKGROUNDS if b != "sea"]
    background = backgrounds[rng.integers(len(backgrounds))]
    colour = None if kind in NATURAL_COLOUR else list(COLOURS)[rng.integers(len(COLOURS))]
    return Scene(
        background=background,
        kind=kind,
        count=int(rng.integers(1, 6)),
        colour=colour,
        size="large" if rng.random() < 0.5 else "small",
        position=list(POSITIONS)[rng.integers(len(POSITIONS))],
        river=bool(background != "sea" and rng.random() < 0.35),
        road=bool(background != "sea" and rng.random() < 0.35),
    )


# --- drawing ---------------------------------------------------------------------------------
def render_scene(scene: Scene, rng: np.random.Generator, size: int = 96,
                 boxes: list[tuple[float, float, float, float]] | None = None) -> Image.Image:
    """Draw a scene as a size x size RGB image; `boxes`, when given, receives each object's
    (x0, y0, x1, y1) pixel box (the drawing and its random draws are the same either way)."""
    base, alt = BACKGROUNDS[scene.background]
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    _draw_texture(draw, scene.background, alt, rng, size)
    if scene.river:
        _draw_river(draw, rng, size)
    if scene.road:
        _draw_road(draw, rng, size)
    cx, cy = POSITIONS[scene.position]
    scale = (0.13 if scene.size == "large" else 0.075) * size
    colour = NATURAL_COLOUR.get(scene.kind) or COLOURS.get(scene.colour or "", (200, 200, 200))
    for k in range(scene.count):
        angle = 2 * math.pi * k / scene.count + rng.uniform(0, 0.5)
        spread = 0 if scene.count == 1 else 0.16 * size
        x = cx * size + spread * math.cos(angle) + rng.normal(0, 0.015 * size)
        y = cy * size + spread * math.sin(angle) + rng.normal(0, 0.015 * size)
        s = scale * rng.uniform(0.85, 1.15)
        _DRAWERS[scene.kind](draw, x, y, s, colour, rng)
        if boxes is not None:
            r = s * _EXTENT[scene.kind]
            boxes.append((max(0.0, x - r), max(0.0, y - r), min(float(size), x + r), min(float(size), y + r)))
    noise = rng.normal(0, 6, (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).filter(ImageFilter.SMOOTH)


def _draw_texture(draw, background, alt, rng, size):
    if background == "farmland":
        step = size // 6
        for i in range(0, size, step):
            if rng.random() < 0.5:
                draw.rectangle([i, 0, i + step // 2, size], fill=alt)
    elif background == "urban":
        for i in range(0, size, size // 8):
            draw.line([i, 0, i, size], fill=alt, width=1)
            draw.line([0, i, size, i], fill=alt, width=1)
    else:
        for _ in range(size // 3):
            x, y = rng.integers(0, size, 2)
            r = rng.integers(2, 6)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=alt)


def _draw_river(draw, rng, size):
    vertical = rng.random() < 0.5
    offset = rng.uniform(0.1, 0.9) * size
    points = []
    for t in np.linspace(0, size, 12):
        wiggle = 0.06 * size * math.sin(t / size * 2 * math.pi + rng.uniform(0, 0.3))
        points.append((offset + wiggle, t) if vertical else (t, offset + wiggle))
    draw.line(points, fill=(50, 90, 170), width=max(3, size // 14))


def _draw_road(draw, rng, size):
    if rng.random() < 0.5:
        y = rng.uniform(0.15, 0.85) * size
        draw.line([(0, y), (size, y)], fill=(70, 70, 70), width=max(2, size // 24))
    else:
        x = rng.uniform(0.15, 0.85) * size
        draw.line([(x, 0), (x, size)], fill=(70, 70, 70), width=max(2, size // 24))


def _box(x, y, w, h):
    return [x - w, y - h, x + w, y + h]


def _building(draw, x, y, s, colour, rng):
    draw.rectangle(_box(x, y, s * 0.9, s * 0.6), fill=colour, outline=(40, 40, 40))


def _tank(draw, x, y, s, colour, rng):
    draw.ellipse(_box(x, y, s * 0.6, s * 0.6), fill=colour, outline=(60, 60, 60))
    draw.ellipse(_box(x, y, s * 0.2, s * 0.2), outline=(90, 90, 90))


def _pond(draw, x, y, s, colour, rng):
    draw.ellipse(_box(x, y, s * rng.uniform(0.7, 1.1), s * rng.uniform(0.4, 0.7)), fill=colour)


def _plane(draw, x, y, s, colour, rng):
    draw.polygon([(x, y - s), (x + s * 0.15, y + s), (x - s * 0.15, y + s)], fill=colour)
    draw.polygon([(x - s, y), (x + s, y), (x, y - s * 0.3)], fill=colour)


def _ship(draw, x, y, s, colour, rng):
    draw.ellipse(_box(x, y, s * 1.0, s * 0.28), fill=colour, outline=(20, 20, 20))


def _field(draw, x, y, s, colour, rng):
    shade = tuple(int(c) for c in rng.integers(120, 220, 3))
    draw.rectangle(_box(x, y, s * 1.1, s * 0.8), fill=(shade[0], shade[1], 60), outline=(90, 70, 40))


def _tree(draw, x, y, s, colour, rng):
    draw.ellipse(_box(x, y, s * 0.5, s * 0.5), fill=colour)


# Half the side of the square that holds each drawing, in units of its size argument.
_EXTENT = {"buildings": 0.9, "storage tanks": 0.6, "ponds": 1.1, "planes": 1.0, "ships": 1.0, "fields": 1.1,
           "trees": 0.5}
_DRAWERS: dict[str, Callable] = {
    "buildings": _building, "storage tanks": _tank, "ponds": _pond, "planes": _plane,
    "ships": _ship, "fields": _field, "trees": _tree,
}


# --- captions --------------------------------------------------------------------------------
def _noun(scene: Scene) -> str:
    return SINGULAR[scene.kind] if scene.count == 1 else scene.kind


def _counted(scene: Scene, with_colour: bool = True, with_size: bool = False) -> str:
    words = ["a" if scene.count == 1 else COUNT_WORDS[scene.count]]
    if with_size:
        words.append(scene.size)
    if with_colour and scene.colour:
        words.append(scene.colour)
    words.append(_noun(scene))
    return " ".join(words)


def _extras(scene: Scene) -> str:
    parts = []
    if scene.river:
        parts.append("next to a river")
    if scene.road:
        parts.append("beside a road")
    return " " + " and ".join(parts) if parts else ""


def _where(scene: Scene) -> str:
    return "in the center" if scene.position == "center" else f"in the {scene.position}"


def _place(background: str) -> str:
    return {"sea": "the sea", "urban": "an urban area"}.get(background, background)


def detailed_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five varied captions, each naming a different subset of the scene's attributes."""
    bg = scene.background
    on = "on the sea" if bg == "sea" else f"on {bg}" if bg != "urban" else "in an urban area"
    verb = "is" if scene.count == 1 else "are"
    templates = [
        f"{_counted(scene)} {_where(scene)} {on}{_extras(scene)}",
        f"there {verb} {_counted(scene, with_size=True)} {_where(scene)} of the image",
        f"an aerial view of {_place(bg)} with {_counted(scene, with_colour=False)}"
        f"{_extras(scene)}",
        f"{_counted(scene, with_size=True)} {on} {_where(scene)}",
        f"{'a ' if scene.count == 1 else ''}{scene.size} {scene.colour + ' ' if scene.colour else ''}"
        f"{_noun(scene)} {verb} located "
        f"{_where(scene)}{_extras(scene)}",
        f"this {bg if bg != 'sea' else 'sea'} scene shows {_counted(scene)}{' and a river' if scene.river else ''}"
        f"{' and a road' if scene.road else ''}",
        f"{COUNT_WORDS[scene.count] if scene.count > 1 else 'a single'} {_noun(scene)} {_where(scene)}",
    ]
    chosen = rng.choice(len(templates), size=5, replace=False)
    return [templates[i].capitalize() + "." for i in sorted(chosen)]


def coarse_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Pre-training captions: the object kind and the background only."""
    bg = scene.background if scene.background != "sea" else "the sea"
    options = [
        f"an aerial image of {scene.kind} on {bg}",
        f"{scene.kind} seen from above on {bg}",
        f"a remote sensing image with {scene.kind}",
        f"a satellite view of {bg} with some {scene.kind}",
        f"{bg} with {scene.kind}",
    ]
    return [o.capitalize() + "." for o in options]


# --- writing ---------------------------------------------------------------------------------
def _split_sizes(images: int) -> dict[str, int]:
    n_val = max(2, round(images * SPLIT_FRACTIONS[1]))
    n_test = max(2, round(images * SPLIT_FRACTIONS[2]))
    return {"train": images - n_val - n_test, "val": n_val, "test": n_test}


def synthesize(
    out: str,
    images: int,
    seed: int = 0,
    pretrain_images: int = 0,
    image_size: int = 96,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write a generated dataset under `out` (local folder or s3:// prefix); returns its manifest."""
    if images < 10:
        raise ValueError(f"--images must be at least 10 (train/val/test need images), got {images}")
    sizes = _split_sizes(images)
    if pretrain_images:
        sizes["pretrain"] = pretrain_images
    image_id = 0
    for split, count in sizes.items():
        entries = []
        for i in range(count):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
            scene = sample_scene(rng)
            img = render_scene(scene, rng, image_size)
            rel = f"{split}/{split}_{i:05d}.png"
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            storage.write_bytes(storage.join(out, "images", rel), buf.getvalue())
            captions = coarse_captions(scene, rng) if split == "pretrain" else detailed_captions(scene, rng)
            label = scene.kind
            if split in ("train", "pretrain"):
                for caption in captions:
                    entries.append({"caption": caption, "image": rel, "image_id": image_id,
                                    "label_name": label, "scene": asdict(scene)})
            else:
                entries.append({"image": rel, "caption": captions, "image_id": image_id,
                                "label_name": label, "scene": asdict(scene)})
            image_id += 1
            if progress and (i + 1) % 200 == 0:
                progress(f"{split}: {i + 1}/{count} images")
        payload = json.dumps(entries, indent=1).encode()
        storage.write_bytes(storage.join(out, "annotations", f"{split}.json"), payload)
        if progress:
            progress(f"{split}: {count} images written")
    manifest = {"generator_version": GENERATOR_VERSION, "seed": seed, "image_size": image_size,
                "splits": sizes, "captions_per_image": 5}
    storage.write_bytes(storage.join(out, "dataset.json"), json.dumps(manifest, indent=1).encode())
    return manifest
