"""HarMA's implementation equals the paper code's forward equations, written out independently.

What this proves: for the bundled tiny architecture (`harma-tiny`, random backbone weights) with
NON-TRIVIAL adapter weights (random, non-zero up-projections, random gates, random temperature),
`harma.model` (adapters.py, harma.py) and `harma.model.losses` give the same

* L2-normalised image and text embeddings,
* contrastive loss, focal-weighted triplet loss and their sum (`harma_loss`, default LossConfig),
* gradient of every trainable parameter (adapters, mini-adapters, gates, temperature),

as a plain-torch re-derivation of the official HarMA code (shared/docs/harma-method.md sections
1.2-1.4 and 2.2), for both layouts ('official': mini-adapter on the text side only; 'paper': the
layer-l mini-adapter shared by the image and the text adapter) and with the text padding mask on
and off. The reference side imports nothing of harma's model code: it reads the frozen backbone's
weights from the open_clip state dict and re-implements LayerNorm, GELU, multi-head attention, the
residual blocks, the towers, the adapters and the losses from their equations. Both sides run in
float64; every comparison uses an absolute tolerance of 1e-6 (`TOL`); the measured differences
are ~1e-15 (printed with `-s`).

The batch has samples that share an image (so the contrastive targets have several positives and
the triplet loss has same-image "negatives") and captions of different lengths (one fills the
context, so it has no padding). Failure power is checked too: mismatched configurations (the other
layout, the other mask setting) and single perturbed parameters are all seen by the comparison.

Run:  .ci/venv pytest tests/unit/test_paper_equivalence.py -q        (add -s to see the diffs)
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from harma.config import LossConfig, ModelConfig
from harma.model import build_model
from harma.model.backbone import arch_info
from harma.model.losses import harma_loss

TOL = 1e-6  # absolute, float64
DTYPE = torch.float64
SOT, EOT = 49406, 49407  # CLIP tokenizer: start / end of text; padding is 0 after EOT

IMAGE_IDS = [0, 1, 0, 2, 1, 3, 4, 0]  # samples 0, 2, 7 share image 0; 1 and 4 share image 1
CAPTION_WORDS = [3, 9, 30, 5, 16, 22, 12, 1]  # 30 words + SOT + EOT fill the 32-token context

CONFIG = ModelConfig.model_validate({
    "backbone": {"arch": "harma-tiny"},
    "adapter": {"rank": 16, "heads": 4, "mini_rank": 8, "mini_heads": 4},
    "temperature_init": 0.07,
})
RANK, HEADS = CONFIG.adapter.rank, CONFIG.adapter.heads  # 16, 4
MINI_RANK, MINI_HEADS = CONFIG.adapter.mini_rank, CONFIG.adapter.mini_heads  # 8, 4
CASES = [(layout, mask) for layout in ("official", "paper") for mask in (False, True)]
CASE_IDS = [f"{layout}-mask_{'on' if mask else 'off'}" for layout, mask in CASES]


# ==============================================================================================
# Reference: primitives (written from their definitions, not taken from torch.nn)
# ==============================================================================================
def ref_linear(x, weight, bias):
    """y = x W^T + b (PyTorch's Linear convention, as the paper code's nn.Linear layers)."""
    return x @ weight.T + bias


def ref_gelu(x):
    """Exact (erf) GELU, nn.GELU() default."""
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


def ref_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_mha(x, w, heads, attn_mask=None, key_padding=None):
    """nn.MultiheadAttention self-attention written out. x: (B, L, E) -> (B, L, E).

    w: {"in_w" (3E, E), "in_b" (3E), "out_w" (E, E), "out_b" (E)}. attn_mask: (L, L) additive;
    key_padding: (B, L) bool, True = that key is ignored.
    """
    b, n, e = x.shape
    d = e // heads
    q, k, v = ref_linear(x, w["in_w"], w["in_b"]).split(e, dim=-1)
    q, k, v = (t.reshape(b, n, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, L, L)
    if attn_mask is not None:
        scores = scores + attn_mask
    if key_padding is not None:
        scores = scores.masked_fill(key_padding[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # (B, H, L, d)
    return ref_linear(out.transpose(1, 2).reshape(b, n, e), w["out_w"], w["out_b"])


def ref_sigmoid(x):
    return 1 / (1 + torch.exp(-x))


# ==============================================================================================
# Reference: the adapters (harma-method.md 1.3 MMadapter, 1.4 BiShareAdapter)
# ==============================================================================================
def ref_bishare_adapter(a, S, key_padding):
    """BiShareAdapter: u = W1 a + b1; q = MHA'(u); [GELU(u), dead]; a + W2 mix(q, u) + b2."""
    u = ref_linear(a, S["W1"], S["b1"])
    q = ref_mha(u, S["mha"], MINI_HEADS, key_padding=key_padding)
    _unused = ref_gelu(u)  # the official code computes it and never uses the result
    g = ref_sigmoid(S["g_s"])
    return a + ref_linear(g * q + (1 - g) * u, S["W2"], S["b2"])


def ref_mmadapter(h, A, share, key_padding):
    """MMadapter: z = GELU(W_down h + b); r = MHA(z); [r = S_l(r)]; r = MHA(r) (same module);
    m = sigma(g_ad) z + (1 - sigma(g_ad)) r; out = h + W_up m + b_up."""
    z = ref_gelu(ref_linear(h, A["W_down"], A["b_down"]))
    r = ref_mha(z, A["mha"], HEADS, key_padding=key_padding)
    if share is not None:
        r = ref_bishare_adapter(r, share, key_padding)
    r = ref_mha(r, A["mha"], HEADS, key_padding=key_padding)
    g = ref_sigmoid(A["g_ad"])
    m = g * z + (1 - g) * r
    return h + ref_linear(m, A["W_up"], A["b_up"])


# ==============================================================================================
# Reference: the residual block and the towers (harma-method.md 1.1, 1.2)
# ==============================================================================================
def ref_residual_block(x, W, p, heads, attn_mask, A, share, key_padding):
    """x <- x + Attn(LN1 x); h = MLP(LN2 x); h <- s MMA(h) + (1 - s) h, s = sigma(g_blk); x + h."""
    x = x + ref_mha(
        ref_layer_norm(x, W[p + "ln_1.weight"], W[p + "ln_1.bias"]),
        {
            "in_w": W[p + "attn.in_proj_weight"], "in_b": W[p + "attn.in_proj_bias"],
            "out_w": W[p + "attn.out_proj.weight"], "out_b": W[p + "attn.out_proj.bias"],
        },
        heads,
        attn_mask=attn_mask,
    )
    y = ref_layer_norm(x, W[p + "ln_2.weight"], W[p + "ln_2.bias"])
    h = ref_linear(ref_gelu(ref_linear(y, W[p + "mlp.c_fc.weight"], W[p + "mlp.c_fc.bias"])),
                   W[p + "mlp.c_proj.weight"], W[p + "mlp.c_proj.bias"])
    s = ref_sigmoid(A["g_blk"])
    h = s * ref_mmadapter(h, A, share, key_padding) + (1 - s) * h
    return x + h


def ref_encode_image(images, W, P, layout, heads, layers):
    """ViT: patches + CLS + positions, ln_pre, blocks (no mask), ln_post on CLS, proj, L2 norm."""
    patch = W["visual.conv1.weight"].shape[-1]
    x = torch.nn.functional.conv2d(images, W["visual.conv1.weight"], stride=patch)  # (B, C, g, g)
    x = x.flatten(2).transpose(1, 2)  # (B, g*g, C)
    cls = W["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + W["visual.positional_embedding"]
    x = ref_layer_norm(x, W["visual.ln_pre.weight"], W["visual.ln_pre.bias"])
    for layer in range(layers):
        share = P["share"][layer] if layout == "paper" else None  # official: image never shares
        x = ref_residual_block(x, W, f"visual.transformer.resblocks.{layer}.", heads, None,
                               P["image"][layer], share, key_padding=None)
    x = ref_layer_norm(x[:, 0], W["visual.ln_post.weight"], W["visual.ln_post.bias"])
    x = x @ W["visual.proj"]
    return x / x.norm(dim=-1, keepdim=True)


def ref_padding(tokens):
    """(B, L) bool: True at the positions after the end-of-text token.

    'Mask on' (harma's `text_padding_mask: true`) means: these positions are ignored as KEYS by
    every adapter attention of the text tower (both calls of the MMadapter's MHA and the
    BiShareAdapter's MHA'); queries are not masked, the backbone's causal attention is unchanged
    and the image tower (also its shared mini-adapter in the paper layout) is never masked.
    """
    eot_at = (tokens == EOT).int().argmax(dim=1)  # first EOT of each caption
    return torch.arange(tokens.shape[1])[None, :] > eot_at[:, None]


def ref_encode_text(tokens, W, P, padding_mask, heads, layers):
    """Token + position embeddings, causal blocks, ln_final, EOT pooling, projection, L2 norm."""
    n = tokens.shape[1]
    x = W["token_embedding.weight"][tokens] + W["positional_embedding"]
    causal = torch.full((n, n), float("-inf"), dtype=x.dtype).triu(1)
    key_padding = ref_padding(tokens) if padding_mask else None  # off: the paper code's no mask
    for layer in range(layers):
        x = ref_residual_block(x, W, f"transformer.resblocks.{layer}.", heads, causal,
                               P["text"][layer], P["share"][layer], key_padding)
    x = ref_layer_norm(x, W["ln_final.weight"], W["ln_final.bias"])
    x = x[torch.arange(x.shape[0]), (tokens == EOT).int().argmax(dim=1)]
    x = x @ W["text_projection"]
    return x / x.norm(dim=-1, keepdim=True)


# ==============================================================================================
# Reference: the losses (harma-method.md 2.2 a, b); L = L_con + L_trip
# ==============================================================================================
def ref_contrastive(v, t, ids, temp):
    """P_ij = 1[id_i = id_j] / #positives_i; L = (L_i2t + L_t2i) / 2 on s_ij / tau."""
    b = len(ids)
    logits = (v @ t.T) / temp
    P = torch.tensor([[float(ids[i] == ids[j]) for j in range(b)] for i in range(b)], dtype=v.dtype)
    P = P / P.sum(dim=1, keepdim=True)

    def direction(lg):
        log_softmax = lg - torch.logsumexp(lg, dim=1, keepdim=True)
        return -(P * log_softmax).sum() / b

    return (direction(logits) + direction(logits.T)) / 2


def ref_triplet(v, t, margin=0.2, gamma=2.0):
    """Sum over i != j of w(c) c for c_s = [m + s_ij - s_ii]+ and c_im = [m + s_ij - s_jj]+,
    w(c) = (1 - exp(-c))^gamma (not detached), halved. Same-image captions count as negatives."""
    s = v @ t.T
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        for j in range(s.shape[0]):
            if i == j:
                continue
            for c in (torch.relu(margin + s[i, j] - s[i, i]), torch.relu(margin + s[i, j] - s[j, j])):
                total = total + (1 - torch.exp(-c)) ** gamma * c
    return total / 2


# ==============================================================================================
# Shared weights: drawn once in the reference's own layout, copied into harma by name
# ==============================================================================================
def ref_parameters(image_width, text_width, image_layers, text_layers, seed=1234):
    """Random NON-TRIVIAL trainable weights in the paper code's structure (all leaves)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=g, dtype=DTYPE) * scale).requires_grad_()

    def gate():  # random gate logits, not the 0.6 of the init
        return (torch.rand((), generator=g, dtype=DTYPE) * 4 - 2).requires_grad_()

    def mha(e):
        return {"in_w": rand(3 * e, e, scale=e ** -0.5), "in_b": rand(3 * e, scale=0.1),
                "out_w": rand(e, e, scale=e ** -0.5), "out_b": rand(e, scale=0.1)}

    def mmadapter(d):
        return {"W_down": rand(RANK, d, scale=d ** -0.5), "b_down": rand(RANK, scale=0.1),
                "mha": mha(RANK), "g_ad": gate(),
                "W_up": rand(d, RANK, scale=RANK ** -0.5), "b_up": rand(d, scale=0.1),  # non-zero
                "g_blk": gate()}

    def bishare():
        return {"W1": rand(MINI_RANK, RANK, scale=RANK ** -0.5), "b1": rand(MINI_RANK, scale=0.1),
                "mha": mha(MINI_RANK), "g_s": gate(),
                "W2": rand(RANK, MINI_RANK, scale=MINI_RANK ** -0.5), "b2": rand(RANK, scale=0.1)}

    return {
        "image": [mmadapter(image_width) for _ in range(image_layers)],
        "text": [mmadapter(text_width) for _ in range(text_layers)],
        "share": [bishare() for _ in range(max(image_layers, text_layers))],
        "temp": (torch.rand((), generator=g, dtype=DTYPE) * 0.15 + 0.03).requires_grad_(),
    }


_ADAPTER_KEYS = {
    "down.weight": ("W_down",), "down.bias": ("b_down",), "gate": ("g_ad",),
    "up.weight": ("W_up",), "up.bias": ("b_up",), "block_gate": ("g_blk",),
}
_MINI_KEYS = {
    "down.weight": ("W1",), "down.bias": ("b1",), "gate": ("g_s",),
    "up.weight": ("W2",), "up.bias": ("b2",),
}
_MHA_KEYS = {
    "attn.in_proj_weight": ("mha", "in_w"), "attn.in_proj_bias": ("mha", "in_b"),
    "attn.out_proj.weight": ("mha", "out_w"), "attn.out_proj.bias": ("mha", "out_b"),
}


def ref_leaf(P, harma_name):
    """The reference tensor that a harma trainable parameter corresponds to."""
    if harma_name == "temperature":
        return P["temp"]
    _, part, layer, rest = harma_name.split(".", 3)  # adapters.<image|text|mini>.<l>.<rest>
    keys = {**(_MINI_KEYS if part == "mini" else _ADAPTER_KEYS), **_MHA_KEYS}[rest]
    node = P["share" if part == "mini" else part][int(layer)]
    for key in keys:
        node = node[key]
    return node


def ref_leaves(P):
    def walk(node):
        if isinstance(node, torch.Tensor):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from walk(value)
        else:
            for value in node:
                yield from walk(value)

    return list(walk(P))


# ==============================================================================================
# The batch and one run of both sides
# ==============================================================================================
def batch():
    g = torch.Generator().manual_seed(7)
    distinct = torch.randn(max(IMAGE_IDS) + 1, 3, 48, 48, generator=g, dtype=DTYPE)
    # Samples of one image id are differently augmented views of it, as in training. (With
    # bit-identical pixels the multi-positive InfoNCE equals the plain diagonal one exactly, so
    # the same-image targets would go untested.)
    views = 0.3 * torch.randn(len(IMAGE_IDS), 3, 48, 48, generator=g, dtype=DTYPE)
    images = distinct[IMAGE_IDS] + views
    tokens = torch.zeros(len(CAPTION_WORDS), 32, dtype=torch.long)
    for row, words in enumerate(CAPTION_WORDS):
        body = torch.randint(1, SOT, (words,), generator=g)  # ids below SOT/EOT, never 0
        tokens[row, : words + 2] = torch.cat([torch.tensor([SOT]), body, torch.tensor([EOT])])
    return images, tokens, torch.tensor(IMAGE_IDS)


def harma_model(layout, mask, P=None):
    cfg = CONFIG.model_copy(update={
        "adapter": CONFIG.adapter.model_copy(update={"layout": layout, "text_padding_mask": mask})
    })
    model = build_model(cfg, seed=0).to(DTYPE)
    if P is not None:
        with torch.no_grad():
            for name, p in model.trainable_named_parameters():
                src = ref_leaf(P, name)
                assert src.numel() == p.numel() and (src.dim() == 0 or src.shape == p.shape), name
                p.copy_(src.detach().reshape(p.shape))
    return model


def backbone_geometry(model):
    clip = model.clip
    # The reference towers assume open_clip's plain ViT/text defaults; check they hold.
    assert clip.visual.pool_type == "tok" and clip.visual.attn_pool is None
    assert not clip.visual.final_ln_after_pool and clip.text_pool_type == "argmax"
    assert isinstance(clip.text_projection, torch.nn.Parameter)
    return {
        "W": {k: v.detach() for k, v in clip.state_dict().items()},
        "image_heads": clip.visual.transformer.resblocks[0].attn.num_heads,
        "text_heads": clip.transformer.resblocks[0].attn.num_heads,
        "image_layers": len(clip.visual.transformer.resblocks),
        "text_layers": len(clip.transformer.resblocks),
    }


def ref_forward(model, P, layout, mask, images, tokens):
    geo = backbone_geometry(model)
    v = ref_encode_image(images, geo["W"], P, layout, geo["image_heads"], geo["image_layers"])
    t = ref_encode_text(tokens, geo["W"], P, mask, geo["text_heads"], geo["text_layers"])
    return v, t


def fresh_parameters():
    arch = arch_info("harma-tiny")
    return ref_parameters(arch.image_width, arch.text_width, arch.image_layers, arch.text_layers)


@functools.cache
def run(layout, mask):
    """Both sides on the same batch and weights: embeddings, losses and gradients."""
    images, tokens, ids = batch()
    P = fresh_parameters()
    model = harma_model(layout, mask, P).train()
    img, txt = model(images, tokens)
    parts = harma_loss(img, txt, ids, model.temperature, LossConfig())
    parts["loss"].backward()
    harma_grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                   for n, p in model.trainable_named_parameters()}

    v, t = ref_forward(model, P, layout, mask, images, tokens)
    con = ref_contrastive(v, t, IMAGE_IDS, P["temp"])
    trip = ref_triplet(v, t)
    (con + trip).backward()
    ref_grads = {n: ref_leaf(P, n).grad.reshape(harma_grads[n].shape) for n in harma_grads}
    used = {id(ref_leaf(P, n)) for n in harma_grads}
    return {
        "model": model, "P": P, "harma": (img.detach(), txt.detach()), "ref": (v.detach(), t.detach()),
        "harma_loss": {k: float(parts[k].detach()) for k in ("contrastive", "triplet", "loss")},
        "ref_loss": {k: float(x.detach()) for k, x in (("contrastive", con), ("triplet", trip),
                                                        ("loss", con + trip))},
        "harma_grads": harma_grads, "ref_grads": ref_grads,
        # reference leaves with a gradient that no harma parameter receives (must be none)
        "orphans": [p for p in ref_leaves(P) if id(p) not in used and p.grad is not None
                    and p.grad.abs().max() > 0],
    }


def max_diff(a, b):
    return float((a - b).abs().max())


# ==============================================================================================
# Tests
# ==============================================================================================
@pytest.mark.parametrize(("layout", "mask"), CASES, ids=CASE_IDS)
def test_embeddings_equal_the_reference(layout, mask):
    r = run(layout, mask)
    (img, txt), (v, t) = r["harma"], r["ref"]
    d_img, d_txt = max_diff(img, v), max_diff(txt, t)
    print(f"\n{layout} mask={mask}: max |image diff| {d_img:.1e}, max |text diff| {d_txt:.1e}")
    assert d_img <= TOL and d_txt <= TOL
    # The adapters really act: the embeddings are far from the bare backbone's.
    bare = harma_model(layout, mask)  # zero up-projections: the plain backbone
    with torch.no_grad():
        b_img, b_txt = bare(*batch()[:2])
    assert max_diff(img, b_img) > 1e-2 and max_diff(txt, b_txt) > 1e-2


@pytest.mark.parametrize(("layout", "mask"), CASES, ids=CASE_IDS)
def test_losses_equal_the_reference(layout, mask):
    r = run(layout, mask)
    h, ref = r["harma_loss"], r["ref_loss"]
    print(f"\n{layout} mask={mask}: harma {h}, |diff| "
          + ", ".join(f"{k} {abs(h[k] - ref[k]):.1e}" for k in h))
    for key in ("contrastive", "triplet", "loss"):
        assert abs(h[key] - ref[key]) <= TOL, key
    assert ref["triplet"] > 0 and ref["contrastive"] > 0
    # The batch exercises what sets these losses apart: same-image captions are positives in
    # L_con (plain diagonal targets would give another value) and active negatives in L_trip.
    v, t = r["ref"]
    P = r["P"]
    diagonal = float(ref_contrastive(v, t, list(range(len(IMAGE_IDS))), P["temp"].detach()))
    assert abs(diagonal - h["contrastive"]) > 1e-3
    s = v @ t.T
    same = [(i, j) for i in range(len(IMAGE_IDS)) for j in range(len(IMAGE_IDS))
            if i != j and IMAGE_IDS[i] == IMAGE_IDS[j]]
    assert max(float(0.2 + s[i, j] - s[i, i]) for i, j in same) > 0


@pytest.mark.parametrize(("layout", "mask"), CASES, ids=CASE_IDS)
def test_gradients_of_every_trainable_parameter_equal_the_reference(layout, mask):
    r = run(layout, mask)
    hg, rg = r["harma_grads"], r["ref_grads"]
    expected_minis = 3  # tiny: 3 layers per tower; one mini per layer in both layouts
    assert sum(n.startswith("adapters.mini.") and n.endswith(".up.weight") for n in hg) == expected_minis
    assert {n.split(".")[1] for n in hg if n != "temperature"} == {"image", "text", "mini"}
    assert not r["orphans"]  # every reference leaf that gets a gradient is a harma parameter
    worst = max(hg, key=lambda n: max_diff(hg[n], rg[n]))
    print(f"\n{layout} mask={mask}: {len(hg)} parameters, max |grad diff| "
          f"{max_diff(hg[worst], rg[worst]):.1e} ({worst}), "
          f"max |grad| {max(float(g.abs().max()) for g in hg.values()):.1e}")
    for name in hg:
        assert max_diff(hg[name], rg[name]) <= TOL, name
        assert float(rg[name].abs().max()) > 0, f"{name}: zero gradient, nothing compared"


def test_padding_mask_changes_the_text_embeddings_only_where_there_is_padding():
    for layout in ("official", "paper"):
        off, on = run(layout, False), run(layout, True)
        padded = torch.tensor([w + 2 < 32 for w in CAPTION_WORDS])
        diff = (off["harma"][1] - on["harma"][1]).abs().amax(dim=1)
        assert (diff[padded] > 1e-3).all(), layout  # pads leak into EOT only without the mask
        assert (diff[~padded] <= TOL).all(), layout  # the full-context caption has no pads
        assert torch.equal(off["harma"][0], on["harma"][0])  # the image tower is never masked
        # and harma with the mask on differs from the unmasked reference (and vice versa)
        assert max_diff(on["harma"][1], off["ref"][1]) > 1e-3
        assert max_diff(off["harma"][1], on["ref"][1]) > 1e-3


def test_layouts_differ_on_images_and_agree_on_text():
    for mask in (False, True):
        official, paper = run("official", mask), run("paper", mask)
        assert max_diff(official["harma"][0], paper["harma"][0]) > 1e-3
        assert max_diff(official["harma"][0], paper["ref"][0]) > 1e-3  # mismatch is detected
        # the text side is the same structure in both layouts (same weights here)
        assert max_diff(official["harma"][1], paper["harma"][1]) <= TOL


def test_mini_gradients_come_from_the_image_tower_only_in_the_paper_layout():
    for mask in (False, True):
        official, paper = run("official", mask), run("paper", mask)
        name = "adapters.mini.0.up.weight"
        assert max_diff(official["harma_grads"][name], paper["harma_grads"][name]) > 1e-6


@pytest.mark.parametrize(
    ("part", "key", "changes"),
    [
        ("image", "W_up", "image"), ("image", "g_blk", "image"), ("image", "g_ad", "image"),
        ("text", "W_up", "text"), ("text", "b_down", "text"), ("share", "W2", "text"),
        ("share", "g_s", "text"),
    ],
)
def test_a_single_perturbed_weight_is_seen(part, key, changes):
    """Each weight group is on the compared path: after a random 0.01 nudge of one weight on the
    reference side only (not a constant nudge: a uniform shift of W_up is removed by the next
    LayerNorm), the reference differs from harma by more than 10 x TOL in the tower that uses it,
    and not at all in the other (in the official layout images never use `share`)."""
    images, tokens, _ = batch()
    base = run("official", True)
    P = fresh_parameters()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        leaf = P[part][1][key]
        leaf.add_(0.01 * torch.randn(leaf.shape, generator=g, dtype=DTYPE))
        v, t = ref_forward(base["model"], P, "official", True, images, tokens)
    seen = {"image": max_diff(v, base["harma"][0]), "text": max_diff(t, base["harma"][1])}
    other = "text" if changes == "image" else "image"
    assert seen[changes] > 10 * TOL, seen
    assert seen[other] <= TOL, seen
