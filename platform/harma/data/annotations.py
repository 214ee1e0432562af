"""Read RSITMD/RSICD annotation files into one image-centred form.

Two layouts exist (harma-method.md section 6):

* train: a JSON list with one entry per caption: `caption` (str), `image` (relative path),
  `image_id` (int, unique per image), optional `label_name` / `label`;
* val/test: a JSON list with one entry per image: `image` and `caption` (a list of strings).

`read_annotations(uri)` accepts either (local path or s3:// URI) and returns `ImageEntry`s in file
order; malformed input raises `AnnotationError` naming the file and the entry index.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from harma import storage

_PUNCT = re.compile(r"[,.'!?\"()*#:;~]")


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class ImageEntry:
    """One image and all its captions."""

    image: str
    captions: tuple[str, ...]
    image_id: int
    label_name: str | None = None


def clean_caption(text: str, max_words: int = 30) -> str:
    """The paper code's `pre_caption`: lower-case, drop punctuation, `-`/`/` -> space, first words."""
    text = _PUNCT.sub("", text.lower()).replace("-", " ").replace("/", " ")
    text = text.replace("<person>", "person")
    words = text.split()
    return " ".join(words[:max_words])


def parse_annotations(entries: object, source: str) -> list[ImageEntry]:
    """Parse a decoded annotation list (either layout) into ImageEntry objects."""
    if not isinstance(entries, list):
        raise AnnotationError(f"{source}: top level must be a list, got {type(entries).__name__}")
    if not entries:
        raise AnnotationError(f"{source}: no entries")
    first = entries[0]
    if not isinstance(first, dict):
        raise AnnotationError(f"{source}: entry 0: expected an object, got {type(first).__name__}")
    if isinstance(first.get("caption"), list):
        return _parse_per_image(entries, source)
    return _parse_per_caption(entries, source)


def _check_entry(entry: object, index: int, source: str) -> dict:
    if not isinstance(entry, dict):
        raise AnnotationError(f"{source}: entry {index}: expected an object, got {type(entry).__name__}")
    image = entry.get("image")
    if not isinstance(image, str) or not image:
        raise AnnotationError(f"{source}: entry {index}: 'image' must be a non-empty string")
    return entry


def _parse_per_image(entries: list, source: str) -> list[ImageEntry]:
    out = []
    for index, raw in enumerate(entries):
        entry = _check_entry(raw, index, source)
        captions = entry.get("caption")
        if not isinstance(captions, list) or not captions:
            raise AnnotationError(
                f"{source}: entry {index} ({entry['image']}): 'caption' must be a non-empty list "
                "(val/test layout: one entry per image)"
            )
        for j, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                raise AnnotationError(
                    f"{source}: entry {index} ({entry['image']}): caption {j} must be a non-empty string"
                )
        image_id = entry.get("image_id", index)
        out.append(ImageEntry(entry["image"], tuple(captions), _as_int(image_id, index, source),
                              entry.get("label_name")))
    return out


def _parse_per_caption(entries: list, source: str) -> list[ImageEntry]:
    order: list[int] = []
    images: dict[int, tuple[str, list[str], str | None]] = {}
    for index, raw in enumerate(entries):
        entry = _check_entry(raw, index, source)
        caption = entry.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise AnnotationError(
                f"{source}: entry {index} ({entry['image']}): 'caption' must be a non-empty string "
                "(train layout: one entry per caption)"
            )
        if "image_id" not in entry:
            raise AnnotationError(f"{source}: entry {index} ({entry['image']}): missing 'image_id'")
        image_id = _as_int(entry["image_id"], index, source)
        if image_id not in images:
            order.append(image_id)
            images[image_id] = (entry["image"], [], entry.get("label_name"))
        elif images[image_id][0] != entry["image"]:
            raise AnnotationError(
                f"{source}: entry {index}: image_id {image_id} names {entry['image']!r} but "
                f"earlier entries name {images[image_id][0]!r}"
            )
        images[image_id][1].append(caption)
    return [ImageEntry(images[i][0], tuple(images[i][1]), i, images[i][2]) for i in order]


def _as_int(value: object, index: int, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AnnotationError(f"{source}: entry {index}: 'image_id' must be an integer, got {value!r}")
    return value


def read_annotations(uri: str) -> list[ImageEntry]:
    """Read an annotation JSON file (local path or s3:// URI)."""
    data = storage.read_bytes(uri)
    try:
        entries = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{uri}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{uri}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    return parse_annotations(entries, str(uri))
