"""A backbone prepared for feature extraction, in one of two runtimes.

- ``torch``: batch norm folded into the convolutions and the network run in ``channels_last``
  memory layout. On a CPU, a face CNN in PyTorch's default NCHW layout runs its depthwise and
  1x1 convolutions through slow paths, and every eval-mode batch norm is one more pass over
  each activation; oneDNN's NHWC kernels and the folded convolutions avoid both.
- ``onnxruntime``: the network exported to ONNX in memory (TorchScript-based exporter) and run
  by onnxruntime (:class:`faceemd.models.backbones.OnnxBackbone`): the fastest real extraction
  path measured for MobileFaceNet (``benchmarks/extraction_throughput.py``).

Either way the features agree with the unprepared network to float32 rounding (the same
products, reordered), which a probe batch checks before the prepared network is used.

Only for evaluation: training keeps the original module (folded batch norm does not train).
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse

from faceemd.models.backbones.base import BackboneOutput
from faceemd.models.backbones.onnx_model import OnnxBackbone

__all__ = ["RUNTIMES", "ExtractionSettings", "InferenceBackbone", "prepare_for_inference"]

log = logging.getLogger(__name__)

# Largest relative difference (max |a - b| / max |b| per output) accepted between the prepared
# and the original network on the probe batch; float32 reordering gives ~1e-6.
PROBE_TOLERANCE = 1e-3


class InferenceBackbone(nn.Module):
    """``net`` (an eval-mode copy, possibly folded) that feeds it ``channels_last`` inputs.

    Returns the original backbone's :class:`BackboneOutput` (embedding ``(N, D)``, grid
    ``(N, C, H, W)``, the grid as a contiguous NCHW tensor as before)."""

    def __init__(self, net: nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.net = net
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> BackboneOutput:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        embedding, grid = self.net(x)
        return BackboneOutput(embedding, grid.contiguous())


RUNTIMES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class ExtractionSettings:
    """How a torch backbone runs during feature extraction: the ``extraction`` group
    (``conf/extraction/default.yaml`` lists the same values; a test keeps them equal).

    runtime: ``'onnxruntime'`` (exported in memory; falls back to ``'torch'`` with a log line
    when the export fails) or ``'torch'``. With ``'torch'``: fold_batchnorm folds each
    eval-mode BatchNorm into the convolution before it (``torch.fx``; a network fx cannot trace
    is kept unfolded, with a log line); channels_last runs it in NHWC layout. The features
    agree to float32 rounding either way, so none of this is part of the cache key.
    """

    runtime: str = "onnxruntime"
    fold_batchnorm: bool = True
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"extraction.runtime must be one of {RUNTIMES}, got {self.runtime!r}")


def prepare_for_inference(
    backbone: nn.Module,
    input_shape: tuple[int, int, int],
    settings: ExtractionSettings = ExtractionSettings(),
) -> nn.Module:
    """An inference copy of ``backbone`` (the original is left untouched), or ``backbone``
    itself when there is nothing to prepare (no parameters: ONNX models already run in
    onnxruntime) or the preparation fails its check.

    input_shape: ``(C, H, W)`` of one input image (the probe batch). settings: the runtime and
    its options (:class:`ExtractionSettings`). The prepared network is checked against the
    original on a random probe batch; past :data:`PROBE_TOLERANCE` it is not used (log line)
    and the original runs instead.
    """
    runtime = settings.runtime
    fold_batchnorm, channels_last = settings.fold_batchnorm, settings.channels_last
    if not any(True for _ in backbone.parameters()):
        return backbone
    param = next(backbone.parameters())
    probe = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    probe = probe.to(param.device, param.dtype)
    prepared = None
    if runtime == "onnxruntime":
        prepared = _onnx_copy(backbone, probe)
    if prepared is None:
        if not (fold_batchnorm or channels_last):
            return backbone
        prepared = _torch_copy(backbone, fold_batchnorm, channels_last)
    with torch.inference_mode():
        want, got = backbone.eval()(probe), prepared(probe)
    worst = max(
        float((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-12))
        for g, w in zip(got, want, strict=True)
    )
    if not worst <= PROBE_TOLERANCE:
        log.warning(
            "the inference-prepared %s differs from the original by %.1e (relative) on a probe "
            "batch; extracting with the original network",
            type(backbone).__name__,
            worst,
        )
        return backbone
    return prepared


def _torch_copy(backbone: nn.Module, fold_batchnorm: bool, channels_last: bool) -> nn.Module:
    net = copy.deepcopy(backbone).eval()
    if fold_batchnorm:
        try:
            net = fuse(net)
        except Exception as err:  # fx cannot trace data-dependent control flow
            log.info(
                "batch norm not folded (%s cannot be traced: %s)", type(backbone).__name__, err
            )
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return InferenceBackbone(net, channels_last)


def _onnx_copy(backbone: nn.Module, probe: Tensor) -> nn.Module | None:
    """``backbone`` exported to ONNX in memory and run by onnxruntime, or None (log line) when
    it cannot be exported or does not run on the CPU."""
    if probe.device.type != "cpu":
        log.info(
            "extraction.runtime=onnxruntime runs on the CPU; keeping torch on %s", probe.device
        )
        return None
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                _Outputs(copy.deepcopy(backbone).eval().float()),
                (probe.float(),),
                buf,
                dynamo=False,
                input_names=["image"],
                output_names=["embedding", "grid"],
                dynamic_axes={"image": {0: "batch"}},
            )
    except Exception as err:
        log.info("%s not exported to ONNX (%s); running it in torch", type(backbone).__name__, err)
        return None
    name = f"<{type(backbone).__name__} exported to ONNX>"
    return OnnxBackbone(name, "embedding", "grid", model_bytes=buf.getvalue())


class _Outputs(nn.Module):
    """``(embedding, grid)`` as a plain tuple, the form the ONNX exporter names outputs by."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(x)
        return out.embedding, out.grid
