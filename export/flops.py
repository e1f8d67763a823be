"""Analytic FLOP count of ONNX graphs at given input shapes (used by `evis bench`).

Convention: 1 multiply-add = 2 FLOPs; only the ops that carry the work are counted:

    Conv           2 * prod(Y.shape) * prod(W.shape[1:])      (W: [M, C/group, k1, k2, ...])
    ConvTranspose  2 * prod(X.shape) * prod(W.shape[1:])      (W: [C, M/group, k1, k2, ...])
    MatMul         2 * prod(Y.shape) * A.shape[-1]            (batch dims broadcast, as numpy)
    Gemm           2 * M * N * K                              (transA/transB honoured)

Bias additions, normalisation, activations, softmax, RoiAlign/GridSample and data movement are
not counted (for the EfficientVIS graphs they are a few percent of the total). Q/DQ (INT8) graphs
keep the same Conv/MatMul nodes, so they count the same work.

Shapes come from `onnx.shape_inference.infer_shapes(..., data_prop=True)` after the graph's
dynamic input dimensions are replaced by the given values. A counted node whose shapes inference
leaves symbolic is listed under `unresolved` (and not counted) rather than guessed.
"""

from __future__ import annotations

import math

COUNTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _dims(value_info):
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            return None  # symbolic or unknown
    return tuple(dims)


def _with_input_shapes(model, input_shapes: dict):
    """A copy of `model` whose graph inputs have the given concrete shapes."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = {i.name for i in m.graph.input}
    unknown = set(input_shapes) - names
    if unknown:
        raise ValueError(f"graph has no input(s) {sorted(unknown)} (inputs: {sorted(names)})")
    for value in m.graph.input:
        if value.name not in input_shapes:
            continue
        shape = tuple(int(d) for d in input_shapes[value.name])
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise ValueError(f"input {value.name}: rank {len(dims)}, given shape {shape}")
        for dim, size in zip(dims, shape):
            dim.Clear()
            dim.dim_value = size
    return m


def node_flops(node, shapes: dict, attrs=None):
    """FLOPs of one counted node, or None when a shape it needs is unknown."""
    from onnx import helper

    attrs = attrs if attrs is not None else {a.name: helper.get_attribute_value(a) for a in node.attribute}
    get = shapes.get
    if node.op_type == "Conv":
        y, w = get(node.output[0]), get(node.input[1])
        if y is None or w is None:
            return None
        return 2 * math.prod(y) * math.prod(w[1:])
    if node.op_type == "ConvTranspose":
        x, w = get(node.input[0]), get(node.input[1])
        if x is None or w is None:
            return None
        return 2 * math.prod(x) * math.prod(w[1:])
    if node.op_type == "MatMul":
        a, y = get(node.input[0]), get(node.output[0])
        if a is None or y is None:
            return None
        return 2 * math.prod(y) * a[-1]
    if node.op_type == "Gemm":
        a, b = get(node.input[0]), get(node.input[1])
        if a is None or b is None:
            return None
        m_, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return 2 * m_ * n * k
    raise ValueError(f"{node.op_type} is not a counted op ({', '.join(COUNTED)})")


def graph_flops(model, input_shapes: dict) -> dict:
    """FLOPs of one ONNX graph (a ModelProto or a path) with `input_shapes` {input: shape}.

    Returns {"flops": int, "by_op": {op: flops}, "counted_nodes": int, "unresolved": [node names]}.
    """
    import onnx

    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model = onnx.load(model, load_external_data=False)  # shapes only: weights not needed
    fixed = _with_input_shapes(model, input_shapes)
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    g = inferred.graph
    shapes = {}
    for value in list(g.input) + list(g.value_info) + list(g.output):
        dims = _dims(value)
        if dims is not None:
            shapes[value.name] = dims
    for tensor in g.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    for node in g.node:  # Constant nodes (weights the exporter wrote as constants)
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = tuple(int(d) for d in a.t.dims)
    by_op, unresolved, counted = {}, [], 0
    for node in g.node:
        if node.op_type not in COUNTED or node.domain not in ("", "ai.onnx"):
            continue
        flops = node_flops(node, shapes)
        if flops is None:
            unresolved.append(node.name or node.output[0])
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + int(flops)
        counted += 1
    return {"flops": int(sum(by_op.values())), "by_op": by_op, "counted_nodes": counted,
            "unresolved": unresolved}


def model_dir_flops(model_dir: str, T: int, H: int, W: int, stages: int | None = None,
                    manifest=None) -> dict:
    """FLOPs per clip of an exported MODEL_DIR's split graphs (backbone + the first `stages`
    stages + the last one's mask head) for clips of T frames of H x W (model input):
    {"graphs": {name: graph_flops result}, "total": int, "T", "H", "W", "stages"}."""
    import os

    from efficientvis.runtime import manifest as manifest_lib
    from efficientvis.runtime.ort_backend import dynamic_input_shapes

    m = manifest or manifest_lib.load(model_dir, verify=False)
    stages = int(stages or m.num_stages)
    names = ["backbone"] + [f"stage_{k}" for k in range(stages)] + [f"mask_{stages - 1}"]
    out = {}
    for name in names:
        entry = m.graph(name)
        shapes = dynamic_input_shapes(entry, T, H, W)
        out[name] = graph_flops(os.path.join(model_dir, entry["file"]), shapes)
    return {"method": "analytic ONNX counter (export/flops.py): 2 x multiply-adds of Conv, "
                      "ConvTranspose, MatMul, Gemm after onnx shape inference",
            "T": int(T), "H": int(H), "W": int(W), "stages": stages,
            "graphs": out, "total": int(sum(g["flops"] for g in out.values()))}


def fused_flops(model_dir: str, T: int, H: int, W: int, manifest=None, graph_dir=None) -> dict:
    """FLOPs per clip of the fused model.onnx (all M stages and the last mask head; the earlier
    stages' class heads are pruned from it)."""
    import os

    from efficientvis.runtime import manifest as manifest_lib
    from efficientvis.runtime.ort_backend import dynamic_input_shapes

    m = manifest or manifest_lib.load(model_dir, verify=False)
    entry = m.graphs.get("model") or {"file": "model.onnx",
                                      "inputs": [{"name": "frames", "shape": ["T", 3, "H", "W"]}]}
    r = graph_flops(os.path.join(graph_dir or model_dir, entry["file"]), dynamic_input_shapes(entry, T, H, W))
    return {"method": "analytic ONNX counter (export/flops.py) on model.onnx", "T": int(T), "H": int(H),
            "W": int(W), "stages": m.num_stages, "graphs": {"model": r}, "total": r["flops"]}


def torch_flops(model, frames, num_iterations=None) -> int:
    """FLOPs of one EfficientVIS forward (one clip) by torch.utils.flop_counter.FlopCounterMode
    (counts conv, mm, bmm, addmm, ... with the same 2 x multiply-add convention): a cross-check of
    the analytic ONNX count. RoIAlign runs its gather kernel here, the algorithm of ONNX RoiAlign;
    eager PyTorch may run the interpolation-matrix products instead, which do more multiply-adds."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from efficientvis.training import roi_align

    x = torch.as_tensor(frames)[None]
    # FlopCounterMode's module tracker trips over parameters that require grad under no_grad
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.no_grad(), roi_align.export_mode("grouped"), FlopCounterMode(display=False) as counter:
            model(x, num_iterations=num_iterations)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return int(counter.get_total_flops())
