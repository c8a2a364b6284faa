"""Editing an ONNX graph in memory so that onnxruntime can run it as a face backbone.

:func:`prepare_graph`: graph inputs that no node consumes are dropped (exporters and
quantisers leave them behind; onnxruntime refuses to run a graph that lists inputs nobody
feeds), the batch dimension of the input and outputs is made symbolic so batches of any size
run, and the requested tensors are added to the graph outputs. :func:`fold_weight_dequantization`
dequantises weight-only quantised initialisers once. :func:`graph_tensors` lists the tensors
and their shapes (for messages naming what exists). Nothing is written to disk.
"""

from __future__ import annotations

import numpy as np
import onnx

__all__ = ["fold_weight_dequantization", "graph_tensors", "prepare_graph"]


def graph_tensors(model) -> dict[str, list]:
    """``name -> shape`` (dims as ints or symbolic names, None when unknown) of every tensor a
    node produces or consumes from the graph's inputs, from ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort; names without shapes still help
        inferred = model
    g = inferred.graph
    consumed = {name for node in g.node for name in node.input}
    out = {}
    for vi in [vi for vi in g.input if vi.name in consumed] + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        dims = None
        if t.HasField("shape"):
            dims = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in t.shape.dim
            ]
        out[vi.name] = dims
    for node in g.node:
        for name in node.output:
            out.setdefault(name, None)
    return out


def prepare_graph(model, outputs: list[str]):
    """A copy of ``model`` that runs in batches and returns exactly ``outputs`` (in order).

    Drops graph inputs no node consumes (and initializers listed as inputs), makes dimension
    0 of the remaining input and of the outputs symbolic (``batch``), and exposes internal
    tensors as outputs. Raises ``ValueError`` listing the graph's tensors and shapes when a
    name in ``outputs`` is not in the graph.
    """
    g = model.graph
    known = {name for node in g.node for name in node.output} | {vi.name for vi in g.input}
    unknown = [name for name in outputs if name not in known]
    if unknown:  # shape inference only to explain the error, not on every build
        tensors = graph_tensors(model)
        listing = "\n  ".join(f"{n}: {s}" for n, s in tensors.items())
        raise ValueError(
            f"tensor(s) {unknown} not in the ONNX graph; its {len(tensors)} tensors "
            f"(name: shape) are:\n  {listing}"
        )
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    consumed = {name for node in g.node for name in node.input}
    initialised = {t.name for t in g.initializer}
    keep = [vi for vi in g.input if vi.name in consumed and vi.name not in initialised]
    del g.input[:]
    g.input.extend(keep)
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.output)}
    del g.value_info[:]  # shapes recorded with batch 1 would contradict batched runs
    del g.output[:]
    for name in outputs:
        g.output.append(
            onnx.helper.make_tensor_value_info(name, elem.get(name) or onnx.TensorProto.FLOAT, None)
        )
    for vi in g.input:
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    return m


def fold_weight_dequantization(model):
    """A copy of ``model`` whose weight-only quantisation is undone in float32: every
    ``DequantizeLinear`` whose inputs are all initializers (int8 weights, their scales and zero
    points; per tensor, per axis or in blocks), and every ``Reshape`` of such a result by a
    constant shape, become float32 initializers. Returns ``(model, folded node count)``.

    onnxruntime neither folds these nodes nor, with the convolution's weight coming out of
    them, fuses the batch norm that follows the convolution: the network dequantises its
    weights and normalises its activations in separate passes on every batch. The folded
    weights are the values ``DequantizeLinear`` computes, ``(q - zero_point) * scale`` in
    float32, so only the fused convolutions' rounding changes the features (about 1e-6).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    values = {t.name: t for t in g.initializer}
    folded: dict[str, np.ndarray] = {}

    def constant(name):
        if name in folded:
            return folded[name]
        return onnx.numpy_helper.to_array(values[name]) if name in values else None

    kept, count = [], 0
    for node in g.node:
        inputs = [constant(i) if i else None for i in node.input]
        if (
            node.op_type == "DequantizeLinear"
            and len(inputs) >= 2
            and all(x is not None for x in inputs)
        ):
            folded[node.output[0]] = _dequantize(node, *inputs)
        elif (
            node.op_type == "Reshape"
            and len(inputs) == 2
            and node.input[0] in folded
            and (inputs[1] is not None)
        ):
            shape = [d if d != 0 else inputs[0].shape[i] for i, d in enumerate(inputs[1])]
            folded[node.output[0]] = inputs[0].reshape(shape)
        else:
            kept.append(node)
            continue
        count += 1
    if not count:
        return m, 0
    used = {i for node in kept for i in node.input} | {o.name for o in g.output}
    del g.node[:]
    g.node.extend(kept)
    remaining = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(remaining)
    g.initializer.extend(
        onnx.numpy_helper.from_array(np.ascontiguousarray(a, np.float32), name)
        for name, a in folded.items()
        if name in used
    )
    return m, count


def _dequantize(node, q, scale, zero_point=None) -> np.ndarray:
    """``DequantizeLinear``'s output for constant inputs (ONNX opset 21 semantics)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
    x = q.astype(np.int32)
    zp = np.zeros_like(scale, np.int32) if zero_point is None else zero_point.astype(np.int32)
    scale = scale.astype(np.float32)
    if scale.ndim and q.ndim:
        axis %= q.ndim
        if block:  # blocks of block_size along axis share a scale
            scale = np.repeat(scale, block, axis)[(slice(None),) * axis + (slice(q.shape[axis]),)]
            zp = np.repeat(zp, block, axis)[(slice(None),) * axis + (slice(q.shape[axis]),)]
        else:  # one scale per index along axis
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (x - zp).astype(np.float32) * scale
