"""TorchScript towers for serving: same embeddings as the eager model, or the eager model is kept."""

import logging

import numpy as np
import pytest
import torch

from harma.serve.traced import trace_tower


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_model_config):
    from harma.config import PlatformConfig
    from harma.model.checkpoint import save_checkpoint
    from harma.model.harma import build_model

    cfg = PlatformConfig().model_copy(update={"model": tiny_model_config})
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_checkpoint(str(path), build_model(tiny_model_config, seed=3), cfg, {})
    return str(path)


class _SignBranch(torch.nn.Module):
    """Python control flow on a tensor's value: a trace records only the branch it took."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if bool(x.sum() > 0) else x + 5


class _ReturnsText(torch.nn.Module):
    def encode(self, x: torch.Tensor):
        return {"embedding": x, "note": "not a tensor"}


def test_a_tower_traced_on_one_batch_size_matches_eager_on_others(tiny_checkpoint):
    from harma.serve.encoder import QueryEncoder

    eager = QueryEncoder(tiny_checkpoint, "cpu", trace=False)
    tokens = eager._tokens(["a b", "three storage tanks next to a river on a desert"])
    graph, why = trace_tower(eager.model, "encode_text", tokens, probes=[tokens[:1]])
    assert why == "" and isinstance(graph, torch.jit.ScriptModule)
    probe = eager._tokens(["x", "planes", "a long caption " * 6, "two bridges", "farmland"])
    with torch.inference_mode():
        assert torch.allclose(graph(probe), eager.model.encode_text(probe), atol=1e-5)
    # The graph shares the model's weights: nothing copied.
    shared = {p.data_ptr() for p in graph.parameters()}
    assert {p.data_ptr() for p in eager.model.parameters()} <= shared


def test_a_trace_that_took_one_branch_is_refused_with_the_difference():
    positive, negative = torch.ones(2, 3), -torch.ones(1, 3)
    graph, why = trace_tower(_SignBranch(), "encode", positive, probes=[negative])
    assert graph is None
    assert why.startswith("encode: traced and eager outputs differ by 6.00e+00 (> 1e-04)")


def test_a_tower_that_cannot_be_traced_is_refused_with_the_error():
    graph, why = trace_tower(_ReturnsText(), "encode", torch.ones(2, 3), probes=[torch.ones(1, 3)])
    assert graph is None and why.startswith("encode: tracing failed: ")


def test_the_query_encoder_runs_traced_towers_with_the_eager_embeddings(tiny_checkpoint):
    from harma.serve.encoder import QueryEncoder

    traced, eager = QueryEncoder(tiny_checkpoint, "cpu"), QueryEncoder(tiny_checkpoint, "cpu", trace=False)
    assert traced.towers == {"text": "traced", "image": "traced"}
    assert eager.towers == {"text": "eager", "image": "eager"}
    assert isinstance(traced._text, torch.jit.ScriptModule) and isinstance(traced._image, torch.jit.ScriptModule)
    texts = ["storage tanks", "a river next to farmland with a road", "planes", "", "x " * 200]
    assert torch.allclose(traced.encode_texts(texts), eager.encode_texts(texts), atol=1e-5)
    size = traced.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, size, size), dtype=np.uint8)
    assert torch.allclose(traced.encode_pixels(pixels), eager.encode_pixels(pixels), atol=1e-5)


def test_a_refused_trace_leaves_that_tower_eager_and_says_why(tiny_checkpoint, monkeypatch, caplog):
    import harma.serve.encoder as encoder_module
    from harma.serve.encoder import QueryEncoder

    real = encoder_module.trace_tower

    def refuse_text(model, method, example, probes, atol):
        if method == "encode_text":
            return None, "encode_text: traced and eager outputs differ by 1.00e+00 (> 1e-04)"
        return real(model, method, example, probes, atol)

    monkeypatch.setattr(encoder_module, "trace_tower", refuse_text)
    with caplog.at_level(logging.WARNING, logger="harma.serve.encoder"):
        enc = QueryEncoder(tiny_checkpoint, "cpu")
    assert enc.towers == {"text": "eager", "image": "traced"}
    assert "text tower stays eager: encode_text: traced and eager outputs differ" in caplog.text
    assert enc.encode_texts(["a river"]).shape == (1, enc.embed_dim)


def test_an_embedding_actor_traces_only_the_tower_it_uses_and_reads_read_only_pixels(tiny_checkpoint, recwarn):
    from harma.serve.encoder import QueryEncoder

    images_only = QueryEncoder(tiny_checkpoint, "cpu", traced=("image",))
    assert images_only.towers == {"text": "eager", "image": "traced"}
    assert QueryEncoder(tiny_checkpoint, "cpu", traced=("text",)).towers == {"text": "traced", "image": "eager"}
    with pytest.raises(ValueError, match=r"traced names towers 'text' and 'image', not \['images'\]"):
        QueryEncoder(tiny_checkpoint, "cpu", traced=("images",))
    pixels = np.random.default_rng(2).integers(0, 256, (3, 3, images_only.image_size, images_only.image_size),
                                               dtype=np.uint8)
    frozen = pixels.copy()
    frozen.flags.writeable = False  # a Ray Data block's pixels, zero-copy
    recwarn.clear()
    got = images_only.encode_pixels(frozen)
    assert not [w for w in recwarn if "not writable" in str(w.message)]
    assert torch.equal(got, images_only.encode_pixels(pixels)) and np.array_equal(frozen, pixels)
