"""Backbone weights: formats, prefixes, TorchScript archives, S3, refusals with key lists."""

import io
import pickle

import pytest
import torch
from safetensors.torch import save_file

from harma.config import BackboneConfig
from harma.model.backbone import CheckpointMismatchError, build_backbone, read_state_dict


@pytest.fixture(scope="module")
def reference():
    clip, _ = build_backbone(BackboneConfig(arch="harma-tiny"))
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # differ from any fresh random init
    return clip


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_round_trip(tmp_path, reference):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    clip, _ = build_backbone(BackboneConfig(arch="harma-tiny", weights_uri=str(path)))
    assert _same_weights(clip, reference)
    assert all(not p.requires_grad for p in clip.parameters())


def test_georsclip_style_pt_with_module_prefix_and_wrapper(tmp_path, reference):
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    state["module.logit_scale"] = reference.logit_scale.detach().reshape(())  # 0-dim, as others write
    path = tmp_path / "RS5M_ViT-B-32_RET-2.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    clip, _ = build_backbone(BackboneConfig(arch="harma-tiny", weights_uri=str(path)))
    assert _same_weights(clip, reference)
    assert clip.logit_scale.dim() == 1


def test_openai_style_torchscript_archive(tmp_path, reference):
    scripted = torch.jit.script(reference)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(scripted, str(path))
    clip, _ = build_backbone(BackboneConfig(arch="harma-tiny", weights_uri=str(path)))
    assert _same_weights(clip, reference)


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"weights": torch.zeros(1), "payload": _Payload()}, f, pickle_module=pickle)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_state_dict(str(path))
    assert "pickled code ran" not in capsys.readouterr().out


def test_mismatched_checkpoint_lists_missing_unexpected_and_shapes(tmp_path):
    vit, _ = build_backbone(BackboneConfig(arch="ViT-B-32"))
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("visual.transformer.resblocks.11.")}
    state["extra.weight"] = torch.zeros(1)
    state["token_embedding.weight"] = torch.zeros(10, 512)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as err:
        build_backbone(BackboneConfig(arch="ViT-B-32", weights_uri=str(path)))
    e = err.value
    assert "visual.transformer.resblocks.11.attn.in_proj_weight" in e.missing
    assert e.unexpected == ["extra.weight"]
    assert e.shapes == ["token_embedding.weight (10, 512) != (49408, 512)"]
    assert "missing keys" in str(e) and "unexpected keys (1): extra.weight" in str(e)


def test_not_a_weights_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a loadable weights file"):
        read_state_dict(str(path))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="no state dict"):
        read_state_dict(str(tmp_path / "list.pt"))


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="unknown architecture 'ViT-Q-99'"):
        build_backbone(BackboneConfig(arch="ViT-Q-99"))


def test_weights_from_s3(s3_server, reference):
    from harma import storage

    s3_server.create_bucket("weights")
    buf = io.BytesIO()
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, buf)
    storage.write_bytes("s3://weights/georsclip/base.pt", buf.getvalue())
    clip, _ = build_backbone(BackboneConfig(arch="harma-tiny", weights_uri="s3://weights/georsclip/base.pt"))
    assert _same_weights(clip, reference)
    with pytest.raises(storage.StorageError, match="s3://weights/nope.pt: no such file"):
        build_backbone(BackboneConfig(arch="harma-tiny", weights_uri="s3://weights/nope.pt"))
