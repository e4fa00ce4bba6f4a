"""Checkpoints of every published layout load by name with shapes checked; bad files fail clearly."""
from __future__ import annotations

import re

import pytest
import torch

from nextvit_model import CheckpointError, create_model, read_checkpoint

from conftest import PicklePayload, photo_batch


def official_layout(state: dict, depths=(3, 4, 10, 3)) -> dict:
    """Our (timm) keys -> the ByteDance release's keys, written independently of the loader."""
    offsets = [sum(depths[:i]) for i in range(4)]
    out = {}
    for key, value in state.items():
        if m := re.match(r"stages\.(\d)\.blocks\.(\d+)\.(.*)", key):
            rest = m.group(3).replace("mlp.fc1.", "mlp.conv1.").replace("mlp.fc2.", "mlp.conv2.")
            key = f"features.{offsets[int(m.group(1))] + int(m.group(2))}.{rest}"
        elif key.startswith("head.fc."):
            key = "proj_head.0." + key[len("head.fc."):]
        out[key] = value
    return out


@pytest.fixture(scope="module")
def s_state(s_model):
    return {k: v.clone() for k, v in s_model.state_dict().items()}


def _logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module-prefix"])
def test_official_classification_layout(tmp_path, s_model, s_state, wrap):
    sd = official_layout(s_state)
    assert not any(k.startswith("stages.") for k in sd) and "proj_head.0.weight" in sd
    if wrap == "module-prefix":
        payload = {"model": {f"module.{k}": v for k, v in sd.items()}}
    elif wrap == "plain":
        payload = sd
    else:
        payload = {wrap: sd, "epoch": 300}
    path = tmp_path / "official.pth"
    torch.save(payload, path)
    ckpt = read_checkpoint(path)
    assert ckpt.layout == "official" and ckpt.variant == "nextvit_small" and ckpt.num_classes == 1000
    model = create_model("s", checkpoint=path)
    x = photo_batch(1)
    assert torch.equal(_logits(model, x), _logits(s_model, x))


def test_timm_layout(tmp_path, s_model, s_state):
    path = tmp_path / "timm.pth"
    torch.save(s_state, path)
    assert read_checkpoint(path).layout == "timm"
    x = photo_batch(1)
    assert torch.equal(_logits(create_model("small", checkpoint=path), x), _logits(s_model, x))


def test_detection_backbone_layout(tmp_path, s_state):
    backbone_sd = {k: v for k, v in official_layout(s_state).items() if not k.startswith(("proj_head", "norm."))}
    g = torch.Generator().manual_seed(0)
    norms = {}
    for i, chs in enumerate((96, 256, 512, 1024)):
        norms[f"extra_norm_list.{i}.weight"] = torch.rand(chs, generator=g) + 0.5
        norms[f"extra_norm_list.{i}.bias"] = torch.randn(chs, generator=g) * 0.1
        norms[f"extra_norm_list.{i}.running_mean"] = torch.randn(chs, generator=g) * 0.1
        norms[f"extra_norm_list.{i}.running_var"] = torch.rand(chs, generator=g) + 0.5
        norms[f"extra_norm_list.{i}.num_batches_tracked"] = torch.tensor(7)
    state = {f"backbone.{k}": v for k, v in {**backbone_sd, **norms}.items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 96, 1, 1)  # ignored: not the backbone
    path = tmp_path / "mask_rcnn.pth"
    torch.save({"state_dict": state, "meta": {"epoch": 12}}, path)
    ckpt = read_checkpoint(path)
    assert ckpt.layout == "official-backbone" and ckpt.has_out_norms and ckpt.num_classes is None
    model = create_model("s", checkpoint=path, features_only=True)
    assert model.out_norms is not None
    torch.testing.assert_close(model.out_norms[2].running_var, norms["extra_norm_list.2.running_var"])
    plain = create_model("s", features_only=True, out_norms=False)
    plain.load_state_dict({k: v for k, v in s_state.items() if not k.startswith(("head.", "norm."))})
    x = photo_batch(1)
    with torch.no_grad():
        raw = plain(x)
        normed = model(x)
    bn = model.out_norms[3]
    expected = (raw[3] - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-5)
    expected = expected * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(normed[3], expected, rtol=1e-5, atol=1e-5)


def test_classification_checkpoint_feeds_a_backbone(s_checkpoint):
    model = create_model("s", checkpoint=s_checkpoint, features_only=True)
    assert model.head is None and model.out_norms is None


def test_other_variant_names_the_right_flag(s_checkpoint):
    with pytest.raises(CheckpointError, match=r"is a nextvit_small checkpoint but nextvit_base was requested: "
                                              r"pass --variant small"):
        create_model("b", checkpoint=s_checkpoint)


def test_missing_and_unexpected_keys_are_listed(tmp_path, s_state):
    sd = dict(s_state)
    del sd["stages.2.blocks.4.e_mhsa.q.weight"]
    sd["stages.2.blocks.4.e_mhsa.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. stages\.2\.blocks\.4\.e_mhsa\.q\.weight\); "
                                              r"1 unexpected \(e\.g\. stages\.2\.blocks\.4\.e_mhsa\.extra\.weight\)"):
        create_model("s", checkpoint=path)


def test_wrong_shape_is_reported(tmp_path, s_state):
    sd = dict(s_state)
    sd["stages.0.blocks.0.mlp.fc1.weight"] = torch.zeros(96, 96, 1, 1)
    path = tmp_path / "shape.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"wrong shape.*mlp\.fc1\.weight \(96, 96, 1, 1\) vs \(288, 96, 1, 1\)"):
        create_model("s", checkpoint=path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"PK\x03\x04 definitely not a zip archive" * 10)
    with pytest.raises(CheckpointError, match="is corrupt or not a PyTorch file"):
        read_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")


def test_unknown_layout(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, path)
    with pytest.raises(CheckpointError, match=r"unknown layout \(first keys: conv1\.weight, fc\.weight\)"):
        read_checkpoint(path)


def test_pickle_payload_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"stem.0.conv.weight": torch.zeros(1)}, "payload": PicklePayload(marker)}, path)
    with pytest.raises(CheckpointError, match="was refused: it holds pickled objects other than tensors"):
        read_checkpoint(path)
    assert not marker.exists()
