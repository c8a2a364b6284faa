"""Backbones: output shapes at their input sizes, strict checkpoint loading, real weights."""

import numpy as np
import pytest
import torch

from faceemd.data.folders import read_image
from faceemd.data.transforms import FaceInput
from faceemd.models.backbones import (
    ArcFaceResNet18,
    InceptionResnetV1,
    MobileFaceNet,
    SphereFace20,
)
from faceemd.models.checkpoint import load_backbone_weights

from .conftest import LFW_112, MOBILEFACENET, needs_shared_weights

CASES = [
    (ArcFaceResNet18, (1, 128, 128), 512, (512, 8, 8)),
    (InceptionResnetV1, (3, 160, 160), 512, (1792, 3, 3)),
    (SphereFace20, (3, 112, 96), 512, (512, 7, 6)),
    (MobileFaceNet, (3, 112, 96), 128, (512, 7, 6)),
]


@pytest.mark.parametrize("cls,shape,dim,grid", CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_output_shapes(cls, shape, dim, grid):
    net = cls().eval()
    with torch.no_grad():
        out = net(torch.randn(2, *shape))
    assert out.embedding.shape == (2, dim)
    assert out.grid.shape == (2, *grid)
    torch.testing.assert_close(out.pooled, out.grid.mean((2, 3)))


def test_state_dict_round_trip_with_module_prefix(tmp_path):
    torch.manual_seed(0)
    src = SphereFace20().eval()
    path = tmp_path / "w.pth"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, path)
    dst = load_backbone_weights(SphereFace20().eval(), path)
    x = torch.randn(1, 3, 112, 96)
    with torch.no_grad():
        torch.testing.assert_close(dst(x).embedding, src(x).embedding)


def test_mismatched_checkpoint_lists_keys(tmp_path):
    path = tmp_path / "w.pth"
    state = MobileFaceNet().state_dict()
    state.pop("linear1.bn.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match=r"missing keys \(1\): linear1.bn.weight") as err:
        load_backbone_weights(MobileFaceNet(), path)
    assert "unexpected keys (1): extra.weight" in str(err.value)
    with pytest.raises(ValueError, match="ignore_keys"):
        load_backbone_weights(ArcFaceResNet18(), path)


def test_ignore_keys_and_unreadable_file(tmp_path):
    net = InceptionResnetV1()
    state = dict(net.state_dict())
    state["logits.weight"] = torch.zeros(10, 512)
    torch.save(state, tmp_path / "facenet.pt")
    load_backbone_weights(InceptionResnetV1(), tmp_path / "facenet.pt", ignore_keys=["logits."])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_backbone_weights(net, tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_backbone_weights(net, tmp_path / "missing.pt")


@needs_shared_weights
def test_real_mobilefacenet_same_person_scores_higher():
    net = load_backbone_weights(MobileFaceNet(), MOBILEFACENET).eval()
    prep = FaceInput((112, 96), 3, 127.5, 128.0)
    people = ["George_W_Bush", "Colin_Powell", "Tony_Blair", "Donald_Rumsfeld"]
    images, labels = [], []
    for person in people:
        for path in sorted((LFW_112 / person).glob("*.jpg"))[:3]:
            x, _ = prep(read_image(path), np.zeros((68, 2), np.float32))
            images.append(x)
            labels.append(person)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(net(torch.stack(images)).embedding, dim=1)
    sim = emb @ emb.T
    lab = np.array(labels)
    same = lab[:, None] == lab[None, :]
    off_diag = ~np.eye(len(lab), dtype=bool)
    same_mean = sim.numpy()[same & off_diag].mean()
    diff_mean = sim.numpy()[~same].mean()
    assert same_mean > diff_mean + 0.2, (same_mean, diff_mean)
