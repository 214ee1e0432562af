"""HarMA adapters: parameter counts, exact identity at init, seeding, sharing, padding mask."""

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
