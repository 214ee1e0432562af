"""HarMA adapters: parameter counts, exact identity at init, the adapted block by hand, seeding,
sharing, padding mask."""

from functools import partial

import pytest
import torch

from harma.config import AdapterConfig, ModelConfig
from harma.model import build_model, parameter_summary
from harma.model.backbone import build_tokenizer


def _with(cfg: ModelConfig, **adapter) -> ModelConfig:
    return cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update=adapter)})


def _perturb_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapters.named_parameters():
            if ".up." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def vit_b32_counts():
    return {layout: parameter_summary(build_model(ModelConfig(adapter=AdapterConfig(layout=layout))))
            for layout in ("official", "paper")}


def test_vit_b32_official_trainable_count_is_the_paper_codes(vit_b32_counts):
    s = vit_b32_counts["official"]
    assert s["trainable_params"] == 5_934_397
    assert s["image_adapters"] == 3_162_648  # 12 x (263,553 + 1 block gate)
    assert s["text_adapters"] + s["mini_adapters"] == 2_771_748
    assert s["mini_adapters"] == 398_604 and s["temperature"] == 1
    assert s["backbone_trainable_params"] == 0
    assert s["backbone_params"] == 151_277_313


def test_vit_b32_paper_layout_shares_minis_so_the_count_is_equal(vit_b32_counts):
    assert vit_b32_counts["paper"]["trainable_params"] == 5_934_397
    assert vit_b32_counts["paper"]["mini_adapters"] == 398_604


def test_rank_changes_the_count(tiny_model_config):
    small = parameter_summary(build_model(_with(tiny_model_config, rank=8, heads=2)))
    large = parameter_summary(build_model(_with(tiny_model_config, rank=32, heads=4)))
    assert small["trainable_params"] < large["trainable_params"]


def test_only_adapters_gates_and_temperature_train(tiny_model_config):
    model = build_model(tiny_model_config)
    names = [n for n, _ in model.trainable_named_parameters()]
    assert names and all(n.startswith("adapters.") or n == "temperature" for n in names)
    assert all(not p.requires_grad for p in model.clip.parameters())
    assert sum(n.endswith("block_gate") for n in names) == 6  # 3 image + 3 text blocks


def test_no_zero_dim_parameters_anywhere(tiny_model_config):
    for name, p in build_model(tiny_model_config).named_parameters():
        assert p.dim() >= 1, f"{name} is 0-dim"


@pytest.mark.parametrize("layout", ["official", "paper"])
def test_embeddings_at_init_equal_the_backbone_exactly(tiny_model_config, layout):
    adapted = build_model(_with(tiny_model_config, layout=layout), seed=3)
    plain = build_model(_with(tiny_model_config, kind="none"), seed=3)
    plain.clip.load_state_dict(adapted.clip.state_dict())
    images = torch.randn(3, 3, 48, 48)
    tokens = torch.from_numpy(build_tokenizer("harma-tiny")(["two red storage tanks", "a pond", "ships on the sea"]))
    with torch.no_grad():
        assert torch.equal(adapted.encode_image(images), plain.encode_image(images))
        assert torch.equal(adapted.encode_text(tokens), plain.encode_text(tokens))
        _perturb_adapters(adapted)  # and the adapters are really in the path
        assert not torch.equal(adapted.encode_image(images), plain.encode_image(images))
        assert not torch.equal(adapted.encode_text(tokens), plain.encode_text(tokens))


def test_adapters_are_seeded_per_instance_and_never_aliased(tiny_model_config):
    state = torch.random.get_rng_state()
    a, b, c = (build_model(tiny_model_config, seed=s) for s in (5, 5, 6))
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    for (na, pa), (_, pb) in zip(a.adapters.named_parameters(), b.adapters.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.adapters.parameters(), c.adapters.parameters(), strict=True))
    with torch.no_grad():
        a.adapters.image[0].down.weight.add_(1.0)
    assert not torch.equal(a.adapters.image[0].down.weight, b.adapters.image[0].down.weight)


def test_paper_layout_routes_images_through_the_shared_mini(tiny_model_config):
    images = torch.randn(2, 3, 48, 48)
    for layout, expect_change in (("official", False), ("paper", True)):
        model = build_model(_with(tiny_model_config, layout=layout), seed=0)
        _perturb_adapters(model)
        with torch.no_grad():
            before = model.encode_image(images)
            for p in model.adapters.mini.parameters():
                p.add_(0.3)
            after = model.encode_image(images)
        assert (not torch.equal(before, after)) == expect_change, layout


def test_text_padding_mask(tiny_model_config):
    tok = torch.from_numpy(build_tokenizer("harma-tiny")(["two red storage tanks in the top left"]))
    eot = int(tok.argmax())
    filled = tok.clone()
    filled[0, eot + 1 :] = 320  # junk after the end-of-text token (smaller id than EOT)
    for masked in (True, False):
        model = build_model(_with(tiny_model_config, text_padding_mask=masked), seed=0)
        _perturb_adapters(model)
        with torch.no_grad():
            same = torch.allclose(model.encode_text(tok), model.encode_text(filled), atol=1e-6)
        assert same == masked


def test_train_backbone_makes_everything_but_logit_scale_train(tiny_model_config):
    model = build_model(tiny_model_config.model_copy(update={"train_backbone": True}))
    assert not model.clip.logit_scale.requires_grad
    assert model.clip.visual.conv1.weight.requires_grad


def _hand_adapted(adapter, h, mini=None, mask=None):
    """`h + sigmoid(g_blk) * delta(h)` written out from the adapter's parts (module docstring)."""
    def attend(attn, x):
        return attn(x, x, x, key_padding_mask=mask, need_weights=False)[0]

    z = torch.nn.functional.gelu(adapter.down(h))
    r = attend(adapter.attn, z)
    if mini is not None:
        u = mini.down(r)
        s = torch.sigmoid(mini.gate)
        r = r + mini.up(s * attend(mini.attn, u) + (1 - s) * u)
    r = attend(adapter.attn, r)
    g = torch.sigmoid(adapter.gate)
    return h + torch.sigmoid(adapter.block_gate) * adapter.up(g * z + (1 - g) * r)


def _hand_block(block, x, attn_mask, adapt):
    """An open_clip residual block with `adapt` applied to the MLP output, before the residual add."""
    x = x + block.ls_1(block.attention(q_x=block.ln_1(x), attn_mask=attn_mask))
    mlp = block.mlp
    return x + block.ls_2(adapt(mlp.c_proj(mlp.gelu(mlp.c_fc(block.ln_2(x))))))


def _record_blocks(blocks, seen: list):
    """Hooks that append (input, attn_mask, output) of every block call to `seen`."""
    def hook(module, args, kwargs, output):
        seen.append((args[0].detach().clone(), kwargs.get("attn_mask"), output.detach().clone()))
    return [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]


def _non_zero_adapters(model, seed=1):
    """Non-zero up-projections and distinct gate values, so a swapped gate or a missed term shows."""
    _perturb_adapters(model, seed)
    with torch.no_grad():
        for adapter in (*model.adapters.image, *model.adapters.text):
            adapter.block_gate.fill_(1.7)
            adapter.gate.fill_(-0.9)
        for mini in model.adapters.mini:
            mini.gate.fill_(0.4)


@pytest.mark.parametrize("layout", ["official", "paper"])
def test_block_output_is_the_hand_computed_adapted_mlp_before_the_residual_add(tiny_model_config, layout):
    model = build_model(_with(tiny_model_config, layout=layout), seed=2)
    _non_zero_adapters(model)
    images = torch.randn(2, 3, 48, 48)
    tokens = torch.from_numpy(build_tokenizer("harma-tiny")(["two red storage tanks", "a pond near a road"]))
    mask = tokens.argmax(dim=-1, keepdim=True) < torch.arange(tokens.shape[1])[None, :]  # after EOT
    towers = (("image", model.clip.visual.transformer.resblocks, lambda: model.encode_image(images), None),
              ("text", model.clip.transformer.resblocks, lambda: model.encode_text(tokens), mask))
    for tower, blocks, encode, key_mask in towers:
        seen: list = []
        handles = _record_blocks(blocks, seen)
        with torch.no_grad():
            encode()
            for layer, (block, (x, attn_mask, out)) in enumerate(zip(blocks, seen, strict=True)):
                adapter = getattr(model.adapters, tower)[layer]
                mini = model.adapters.mini[layer] if tower == "text" or layout == "paper" else None
                want = _hand_block(block, x, attn_mask, partial(_hand_adapted, adapter, mini=mini, mask=key_mask))
                torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=f"{tower} block {layer}")
                # ...and not what the adapter placed after the residual add would give.
                after_add = _hand_adapted(adapter, _hand_block(block, x, attn_mask, lambda h: h), mini, key_mask)
                assert (out - after_add).abs().max() > 1e-3, f"{tower} block {layer}"
        for handle in handles:
            handle.remove()


def test_changing_one_layers_adapter_changes_only_outputs_downstream_of_it(tiny_model_config):
    model = build_model(tiny_model_config, seed=2)
    _non_zero_adapters(model)
    images = torch.randn(2, 3, 48, 48)
    tokens = torch.from_numpy(build_tokenizer("harma-tiny")(["two red storage tanks", "a pond near a road"]))

    def block_outputs():
        seen: list = []
        handles = [*_record_blocks(model.clip.visual.transformer.resblocks, seen),
                   *_record_blocks(model.clip.transformer.resblocks, seen)]
        with torch.no_grad():
            embeddings = (model.encode_image(images), model.encode_text(tokens))
        for handle in handles:
            handle.remove()
        return [out for _, _, out in seen], embeddings  # image blocks 0..2, then text blocks 0..2

    before, (img0, txt0) = block_outputs()
    with torch.no_grad():
        model.adapters.image[1].up.weight.mul_(-2.0)
    after, (img1, txt1) = block_outputs()
    changed = [not torch.equal(a, b) for a, b in zip(before, after, strict=True)]
    assert changed == [False, True, True, False, False, False]  # image block 1 and 2 only
    assert not torch.equal(img0, img1) and torch.equal(txt0, txt1)
    with torch.no_grad():
        model.adapters.text[2].block_gate.fill_(-3.0)
    last, (img2, txt2) = block_outputs()
    changed = [not torch.equal(a, b) for a, b in zip(after, last, strict=True)]
    assert changed == [False, False, False, False, False, True]  # the last text block only
    assert torch.equal(img1, img2) and not torch.equal(txt1, txt2)
