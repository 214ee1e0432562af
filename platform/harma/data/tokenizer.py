"""CLIP's byte-level BPE tokenizer without torch: captions -> token ids as numpy arrays.

    from harma.data.tokenizer import ClipTokenizer
    ids = ClipTokenizer(context_length=77)(["two bridges over a river"])  # (1, 77) int64

It gives the ids of open_clip's `SimpleTokenizer` (tests/unit/test_tokenizer.py checks them side by
side), from the merge table the open_clip wheel ships. Why a second implementation: importing
open_clip imports torch, torchvision and timm, ~8 s of CPU; Ray Data's stream tasks, which tokenise
every caption, run in fresh worker processes, and on a 2-core machine with 14 of them the first
training epoch waited 70 s for its first batch while they imported. This module needs only ftfy,
regex and the merge table.

How a caption becomes ids: ftfy and HTML unescaping, whitespace collapsed, lower case; split into
pieces (words, single digits, punctuation runs, English contractions); each piece's UTF-8 bytes
written as printable symbols; adjacent symbols merged, lowest-ranked pair of the merge table first,
until no pair is in the table (the last symbol carries the end-of-word mark `</w>`); ids wrapped in
start and end tokens, cut to the context length (ending on the end token) and zero-padded.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"  # in the open_clip package folder
MERGES_USED = 49152 - 256 - 2  # CLIP's vocabulary: 2 x 256 byte symbols + these merges + 2 specials
START, END = "<start_of_text>", "<end_of_text>"
END_OF_WORD = "</w>"
PIECE_CACHE_MAX = 200_000  # pieces whose ids are kept: a serving replica sees unbounded user text
# Specials first (kept whole), then contractions, letter runs, single digits, other non-space runs.
_PIECES = regex.compile(
    rf"{START}|{END}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE)


def merges_path() -> Path:
    """The merge table inside the installed open_clip package, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip is not installed: its wheel holds CLIP's BPE merge table")
    return Path(next(iter(spec.submodule_search_locations))) / MERGES_FILE


def byte_symbols() -> tuple[dict[int, str], list[str]]:
    """Each byte's printable stand-in, and the 256 stand-ins in vocabulary order.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves and come first; the
    other 68 (controls, space, soft hyphen, ...) become chr(256), chr(257), ... in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    symbol = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return symbol, [symbol[b] for b in printable + others]


def clean_text(text: str) -> str:
    """ftfy-fixed, HTML-unescaped (twice, as CLIP does), whitespace-collapsed, lower-case text."""
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()


def bpe_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge adjacent symbols, the pair of lowest rank first (every non-overlapping occurrence, left
    to right), until no adjacent pair has a rank."""
    while len(symbols) > 1:
        best = min(zip(symbols[:-1], symbols[1:], strict=True), key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


@lru_cache(maxsize=2)
def _vocabulary(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(symbol -> id, merge pair -> rank) of a merge table file."""
    lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")[1 : MERGES_USED + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != MERGES_USED or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: not CLIP's BPE merge table ({len(merges)} merges, want {MERGES_USED})")
    _, alphabet = byte_symbols()
    vocab = [*alphabet, *(s + END_OF_WORD for s in alphabet), *("".join(m) for m in merges), START, END]
    return {s: i for i, s in enumerate(vocab)}, {m: r for r, m in enumerate(merges)}


class ClipTokenizer:
    """Captions -> (N, context_length) int64 ids; see the module docstring."""

    def __init__(self, context_length: int = 77, merges: str | Path | None = None):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), not {context_length}")
        self.context_length = context_length
        self._ids, self._ranks = _vocabulary(str(merges or merges_path()))
        self._byte_symbol, _ = byte_symbols()
        self.start_id, self.end_id = self._ids[START], self._ids[END]
        self._piece_ids: dict[str, list[int]] = {START: [self.start_id], END: [self.end_id]}

    @property
    def vocab_size(self) -> int:
        return len(self._ids)

    def _ids_of_piece(self, piece: str) -> list[int]:
        ids = self._piece_ids.get(piece)
        if ids is None:
            symbols = [self._byte_symbol[b] for b in piece.encode("utf-8")]
            symbols[-1] += END_OF_WORD
            ids = [self._ids[s] for s in bpe_merge(symbols, self._ranks)]
            if len(self._piece_ids) < PIECE_CACHE_MAX:
                self._piece_ids[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without start and end tokens or any length limit."""
        return [i for piece in _PIECES.findall(clean_text(text)) for i in self._ids_of_piece(piece)]

    def __call__(self, texts: str | list[str]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else texts
        out = np.zeros((len(texts), self.context_length), np.int64)
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text)][: self.context_length - 1] + [self.end_id]
            out[row, : len(ids)] = ids
        return out
