"""The inference-prepared backbone (faceemd.models.inference) against the network as loaded.

Reference: the original eval-mode module on the same inputs. Tolerance: 1e-4 relative to the
output's largest magnitude (folding batch norm and changing layout reorder float32 sums:
~1e-6 measured; a wrong fold or a mislaid channel gives errors of order 1).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from faceemd.models.backbones import ArcFaceResNet18, FaceBackbone, MobileFaceNet, TinyFaceNet
from faceemd.models.inference import RUNTIMES, ExtractionSettings, prepare_for_inference

TOL = 1e-4


def _trained_stats(net: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics (fresh ones are 0/1, which would hide a bad fold)."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            if m.affine:
                m.weight.data.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return net.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (MobileFaceNet, (3, 112, 96)),
        (lambda: ArcFaceResNet18(), (1, 128, 128)),
        (lambda: TinyFaceNet(), (1, 64, 64)),
    ],  # fmt: skip
)
def test_prepared_backbone_matches_original(make, shape, runtime):
    torch.manual_seed(0)
    net = _trained_stats(make())
    prepared = prepare_for_inference(net, shape, ExtractionSettings(runtime))
    assert prepared is not net
    x = torch.randn(5, *shape)  # another batch size than the probe's
    with torch.inference_mode():
        want, got = net(x), prepared(x)
    assert got.embedding.shape == want.embedding.shape
    assert got.grid.shape == want.grid.shape
    assert _rel(got.embedding, want.embedding) < TOL
    assert _rel(got.grid, want.grid) < TOL
    # the original is untouched: still NCHW, batch norm still there
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_nothing_to_prepare_returns_the_backbone():
    class NoParams(FaceBackbone):
        def features(self, x):
            return x, x.mean((2, 3))

    net = NoParams()
    assert prepare_for_inference(net, (3, 8, 8), ExtractionSettings("onnxruntime")) is net
    plain = _trained_stats(TinyFaceNet())
    assert (
        prepare_for_inference(plain, (1, 64, 64), ExtractionSettings("torch", False, False))
        is plain
    )


def test_untraceable_backbone_still_runs_unfolded():
    class Branchy(FaceBackbone):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def features(self, x):
            y = self.bn(self.conv(x))
            if float(y.mean()) > 1e9:  # data-dependent branch: torch.fx cannot trace it
                y = -y
            return y, y.mean((2, 3))

    net = _trained_stats(Branchy())
    prepared = prepare_for_inference(net, (3, 16, 16), ExtractionSettings("torch"))
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        assert _rel(prepared(x).grid, net(x).grid) < TOL
    assert any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())  # not folded


def test_unknown_runtime_is_refused():
    with pytest.raises(ValueError, match="extraction.runtime"):
        prepare_for_inference(TinyFaceNet(), (1, 64, 64), ExtractionSettings("tensorrt"))


@pytest.mark.parametrize("layout", ["tensor", "axis", "block"])
def test_weight_dequantization_folds_to_what_onnxruntime_computes(layout):
    """int8 weights -> DequantizeLinear (per tensor, per output channel, or in blocks of 4
    input channels) -> Reshape -> Conv -> BatchNormalization: the folded graph has no
    DequantizeLinear left, its folded weights equal onnxruntime's own DequantizeLinear output
    exactly, and its outputs match the quantised graph's (batch norm fused: 1e-5)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from faceemd.models.backbones.onnx_graph import fold_weight_dequantization

    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (6, 8), dtype=np.int8)  # 6 output x 8 input channels (1x1)
    scale_shape = {"tensor": (), "axis": (6,), "block": (6, 2)}[layout]
    scale = rng.uniform(0.01, 0.1, scale_shape).astype(np.float32)
    zero = rng.integers(-3, 4, scale_shape, dtype=np.int8)
    attrs = {"tensor": {}, "axis": {"axis": 0}, "block": {"axis": 1, "block_size": 4}}[layout]
    bn = [rng.uniform(0.5, 2, 6).astype(np.float32) for _ in range(4)]
    inits = [
        numpy_helper.from_array(q, "wq"), numpy_helper.from_array(scale, "ws"),
        numpy_helper.from_array(zero, "wz"),
        numpy_helper.from_array(np.array([6, 8, 1, 1], np.int64), "shape"),
        *[numpy_helper.from_array(a, n) for a, n in zip(bn, ["g", "b", "m", "v"], strict=True)],
    ]  # fmt: skip
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w2d"], **attrs),
        helper.make_node("Reshape", ["w2d", "shape"], ["w"]),
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8, 5, 5])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("w2d", TensorProto.FLOAT, None),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    folded, count = fold_weight_dequantization(model)
    assert count == 2
    assert "DequantizeLinear" not in {n.op_type for n in folded.graph.node}

    def run(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        x = rng.standard_normal((2, 8, 5, 5)).astype(np.float32)
        return session.run(None, {"x": x}), x

    (y_ref, w_ref), x = run(model)
    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    y, w = session.run(None, {"x": x})
    np.testing.assert_array_equal(w, w_ref)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    # and by hand for the per-tensor case: (q - zero) * scale
    if layout == "tensor":
        np.testing.assert_array_equal(w_ref, (q.astype(np.float32) - float(zero)) * scale)


class _UsersNet(torch.nn.Module):
    """Written the way a user's port of a face model is: functional ops and padding in
    forward, no batch norm, the grid taken from a submodule by hook (dlib-style names)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 8, 3)
        self.conv256_down_out = torch.nn.Conv2d(8, 16, 3, stride=2)
        self.fc = torch.nn.Linear(16, 12, bias=False)

    def forward(self, x):
        x = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
        x = torch.relu(self.conv_in(x))
        x = self.conv256_down_out(x)
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_users_module_runs_through_the_default_extraction_path(runtime):
    """Used to die in copy.deepcopy (a non-leaf tensor left by the grid hook after the failed
    ONNX export); now every preparation applies or is skipped, and the features match."""
    from faceemd.models.backbones import TorchBackbone

    torch.manual_seed(0)
    backbone = TorchBackbone(_UsersNet(), grid_layer="conv256_down_out").eval()
    prepared = prepare_for_inference(backbone, (3, 20, 20), ExtractionSettings(runtime))
    x = torch.randn(3, 3, 20, 20)
    with torch.inference_mode():
        want, got = backbone(x), prepared(x)
    assert got.grid.shape == (3, 16, 9, 9) and got.embedding.shape == (3, 12)
    torch.testing.assert_close(got.grid.float(), want.grid, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.embedding.float(), want.embedding, atol=1e-4, rtol=1e-4)
    copy.deepcopy(backbone)  # nothing of a forward pass is left on the module
