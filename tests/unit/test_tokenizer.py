"""harma.data.tokenizer: open_clip's token ids without importing torch."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest

from harma.data.tokenizer import ClipTokenizer, bpe_merge, byte_symbols

ANNOTATIONS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "annotations"
# Captions that exercise every rule: HTML entities, accents, non-Latin scripts, digits, contractions,
# punctuation runs, control and zero-width characters, emoji, over-long text, a special token typed
# by a user, the empty string.
AWKWARD = [
    "Two bridges over a river &amp;amp; farmland!!", "  café naïve résumé  ", "<end_of_text> injected",
    "1234567 storage tanks, 3.5km apart", "emoji 🚢🌊 ships", "ÆØÅ æøå ß", "a" * 300, "x " * 100, "",
    "don't it's we're I've I'm you'll he'd", "UPPER Case MiXeD", "tab\tnew\nline",
    "\u00ad soft hyphen \u200b zero width", "港口 停着 三艘船", "a-b_c/d\\e", "mojibake: cafÃ©",
]


def _reference(texts: list[str], context_length: int = 77) -> np.ndarray:
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)(texts).numpy()


def test_known_ids_of_clip_vocabulary():
    ids = ClipTokenizer(8)(["a diagram", "a dog and a cat on a mat next to"])
    assert ids.dtype == np.int64
    # 49406/49407: start/end of text; 320 "a</w>", 22697 "diagram</w>" in CLIP's vocabulary.
    assert ids[0].tolist() == [49406, 320, 22697, 49407, 0, 0, 0, 0]
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407  # cut to 8, ending on the end token
    assert ClipTokenizer().vocab_size == 49408


def test_same_ids_as_open_clip_on_awkward_text_and_synthetic_captions(synth_root):
    captions = list(AWKWARD)
    for split in ("train", "val", "test"):
        for entry in json.loads((Path(synth_root) / "annotations" / f"{split}.json").read_text()):
            captions.extend(entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]])
    for context_length in (77, 12):
        np.testing.assert_array_equal(ClipTokenizer(context_length)(captions), _reference(captions, context_length))


@pytest.mark.skipif(not ANNOTATIONS.is_dir(), reason="the RSITMD/RSICD annotations are not beside the repo")
def test_same_ids_as_open_clip_on_every_rsitmd_and_rsicd_caption():
    captions = [c for f in sorted(ANNOTATIONS.glob("*.json")) for e in json.loads(f.read_text())
                for c in (e["caption"] if isinstance(e["caption"], list) else [e["caption"]])]
    assert len(captions) > 10_000
    np.testing.assert_array_equal(ClipTokenizer()(captions), _reference(captions))


def test_bpe_merges_the_lowest_ranked_pair_first_everywhere():
    ranks = {("a", "b"): 0, ("b", "c"): 1, ("ab", "ab"): 2}
    assert bpe_merge(list("abcab"), ranks) == ["ab", "c", "ab"]  # (a,b) before (b,c), both places
    assert bpe_merge(list("abab"), ranks) == ["abab"]
    assert bpe_merge(list("xyz"), ranks) == ["x", "y", "z"]


def test_byte_symbols_are_printable_and_distinct():
    symbol, order = byte_symbols()
    assert len(set(symbol.values())) == 256 and sorted(order) == sorted(symbol.values())
    assert symbol[ord("a")] == "a" and symbol[ord(" ")] == chr(256 + 32)  # space: the 33rd non-printable
    assert order[0] == "!" and all(not s.isspace() for s in order)


def test_a_stream_task_tokenises_without_importing_torch():
    code = ("import sys; from harma.data.datasets import emit_pairs, _tokenizer; "
            "print(_tokenizer(77)(['two ships']).shape, 'torch' in sys.modules, 'open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(1,", "77)", "False", "False"]


def test_bad_context_length_and_merge_table_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        ClipTokenizer(1)
    bad = tmp_path / "merges.txt.gz"
    bad.write_bytes(gzip.compress(b"header\nh e\n"))
    with pytest.raises(ValueError, match="not CLIP's BPE merge table"):
        ClipTokenizer(merges=bad)
