"""`evis export`: checkpoint -> MODEL_DIR with backbone.onnx, stage_0.onnx .. stage_{M-1}.onnx,
mask_0.onnx .. mask_{M-1}.onnx, [model.onnx], initial_queries.npy and manifest.json (interface:
ARCHITECTURE.md, "ONNX interface").

How each graph is made:
- The wrappers of `graphs.py` (one clip, no batch axis) are exported one by one with the dynamo
  exporter (`torch.onnx.export(..., dynamo=True)`), T, H, W dynamic through `dynamic_shapes`
  (the stage graphs take the four feature maps with their own dynamic sizes H4/W4 .. H32/W32),
  N, C, K static. RoIAlign becomes one ONNX `RoiAlign` node (half_pixel, explicit sampling_ratio)
  through `roi_align.ONNX_TRANSLATION_TABLE`, or the plugin-free GridSample form
  (`--roi-align gridsample`), or per FPN level on that level's RoIs only (`--roi-align grouped`:
  NonZero/GatherND/ScatterND, data-dependent shapes; ONNX Runtime only, a quarter of the RoIAlign
  work of the static forms, which pool every RoI at every level for TensorRT).
- torch 2.13's exporter writes opset >= 18 only. For `--opset 17` (default: what TensorRT 8.6 and
  every 10.x parse) the optimised opset-18 graph is converted with ONNX's version converter, which
  leaves an attribute opset 17 does not know on ReduceL2/ReduceMean (`noop_with_empty_axes`); it
  is dropped where it has no effect (value 0, or constant non-empty axes) and the graph is checked
  again. Opset 16 is refused: it has no LayerNormalization.
- Post-processing: graph input/output axes get the manifest's names (T, H, W, H4 ... W32),
  unused initializers are removed, `onnx.checker.check_model(full_check=True)` must pass.
- `--fused`: model.onnx is the backbone, the M stages and the last mask head joined in ONNX (no
  second trace): every graph's tensors are prefixed with its name (`stage_k/`, `mask_k/`), stage
  k's queries_in/proposals_in are wired to stage k-1's outputs, and what the outputs do not need
  (earlier stages' class heads) is pruned.
- `--simplify`: onnxslim (if installed) on each graph; kept only where it removes nodes, and the
  verification below covers the simplified graphs.
- Verification (unless `--no-verify`): every graph runs in ONNX Runtime (CPU) at a clip length and
  frame size different from the traced ones: the backbone and each stage against the PyTorch
  wrappers on the same inputs (random uint8 frames, every other slot starting from a carried box;
  features, queries and proposals from PyTorch),
  the fused graph against the split graphs run in sequence. The max abs error per output goes into
  the manifest; an error above 1e-3 + 1e-5 * max|reference| fails the export.

The manifest (runtime/manifest.py) is written last, atomically; files of an earlier export in the
folder (same names) are removed first, so a folder with a manifest is always one complete export.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from datetime import datetime, timezone

import numpy as np

from efficientvis import __version__
from efficientvis.errors import UserError
from efficientvis.export import graphs as G
from efficientvis.runtime import manifest as manifest_lib
from efficientvis.runtime.carry import clip_start_inputs

# --roi-align: how the stages and mask heads pool (training/roi_align.py, export modes)
ROI_FORMS = {"roialign": "RoiAlign at every FPN level", "gridsample": "GridSample at every FPN level",
             "grouped": "RoiAlign per FPN level on its own RoIs (ONNX Runtime only)"}
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 17, 20, 17
EXPORTER_MIN_OPSET = 18  # torch 2.13's dynamo exporter
# bumped when the same checkpoint exports to different graphs (evis bench's cached exports are
# keyed by it); 2: model.onnx keeps each graph's own symbolic dims apart; 3: Eq. 3's cosine
# similarity divides by one norm at a time (no float16 underflow to NaN); 4: stage_0 takes the
# carried proposals (carried, carried_boxes)
EXPORT_REVISION = 4
MIN_SIZE = 32  # smallest frame side the graphs are declared for (P5 is then 1 x 1)
# Larger than this the graph's weights go to a .data file next to it (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1536 << 20
# Verification tolerance (ORT vs PyTorch, float32): |a - b| <= ATOL + RTOL * max|b| per output.
VERIFY_ATOL, VERIFY_RTOL = 1e-3, 1e-5
STAGING_PREFIX = ".export-"  # the folder inside MODEL_DIR an export is written to first
OWN_FILES = re.compile(r"^(backbone|stage_\d+|mask_\d+|model)\.onnx(\.data)?$|^initial_queries\.npy$|^manifest\.json$")


# ----------------------------------------------------------------------------------------------
# shapes and axes
# ----------------------------------------------------------------------------------------------

def axis_ranges(max_clip: int, test_size: int, max_size: int, min_size: int = MIN_SIZE) -> dict:
    """The manifest's dynamic axes: T, H, W and the feature-map axes derived from H, W."""
    opt_h = min(max(test_size, min_size), max_size)
    opt_w = min(max(round(test_size * 16 / 9), min_size), max_size)
    axes = {"T": {"min": 1, "opt": max_clip, "max": max_clip},
            "H": {"min": min_size, "opt": opt_h, "max": max_size},
            "W": {"min": min_size, "opt": opt_w, "max": max_size}}
    for stride in G.STRIDES:
        for side in ("H", "W"):
            base = axes[side]
            axes[f"{side}{stride}"] = {"expr": f"ceil({side}/{stride})",
                                       **{k: -(-base[k] // stride) for k in ("min", "opt", "max")}}
    return axes


def graph_spec(name: str, N: int, C: int, K: int, mask_size: int) -> tuple[list, list]:
    """(inputs, outputs) of graph `name`: [{name, dtype, shape}] with axis names for dynamic axes."""
    def feature(i):
        s = G.STRIDES[i]
        return {"name": G.FEATURES[i], "dtype": "float32", "shape": ["T", C, f"H{s}", f"W{s}"]}

    frames = {"name": "frames", "dtype": "uint8", "shape": ["T", 3, "H", "W"]}
    init_queries = {"name": "init_queries", "dtype": "float32", "shape": [N, C]}
    image_size = {"name": "image_size", "dtype": "float32", "shape": [2]}
    carried = {"name": "carried", "dtype": "float32", "shape": [N]}
    carried_boxes = {"name": "carried_boxes", "dtype": "float32", "shape": [N, 4]}
    out = {"queries": [N, "T", C], "proposals": [N, "T", 4], "class_logits": [N, "T", K],
           "attended": [N, "T", C], "mask_probs": [N, "T", mask_size, mask_size], "next_queries": [N, C]}
    features = [feature(i) for i in range(4)]
    inputs, outputs = G.graph_io_names(name)
    if name == "backbone":
        return [frames], features
    table = {f["name"]: f for f in features}
    table.update(frames=frames, init_queries=init_queries, image_size=image_size, carried=carried,
                 carried_boxes=carried_boxes,
                 queries_in={"name": "queries_in", "dtype": "float32", "shape": [N, "T", C]},
                 proposals_in={"name": "proposals_in", "dtype": "float32", "shape": [N, "T", 4]},
                 attended={"name": "attended", "dtype": "float32", "shape": [N, "T", C]},
                 proposals={"name": "proposals", "dtype": "float32", "shape": [N, "T", 4]})
    return ([table[n] for n in inputs],
            [{"name": n, "dtype": "float32", "shape": out[n]} for n in outputs])


# ----------------------------------------------------------------------------------------------
# ONNX post-processing (onnx imported lazily: the CLI imports this module to build its parser)
# ----------------------------------------------------------------------------------------------

def _set_io_shapes(model, inputs: list, outputs: list) -> None:
    """Name the graph's input/output axes as the manifest does (the exporter names outputs' axes
    after its own symbolic expressions)."""
    specs = {s["name"]: s for s in inputs + outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        spec = specs.get(value.name)
        if spec is None:
            raise RuntimeError(f"exported graph has an unexpected input/output {value.name!r}")
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(spec["shape"]):
            raise RuntimeError(f"{value.name}: exported rank {len(dims)}, interface rank {len(spec['shape'])}")
        for dim, want in zip(dims, spec["shape"]):
            if isinstance(want, int):
                if dim.HasField("dim_param") or dim.dim_value != want:
                    raise RuntimeError(f"{value.name}: exported shape "
                                       f"{[d.dim_param or d.dim_value for d in dims]}, interface {spec['shape']}")
            else:
                dim.Clear()
                dim.dim_param = want
    names = [v.name for v in model.graph.input], [v.name for v in model.graph.output]
    if names != ([s["name"] for s in inputs], [s["name"] for s in outputs]):
        raise RuntimeError(f"exported graph has inputs/outputs {names}")


def _prune(model) -> None:
    """Remove nodes that no graph output depends on, then unused initializers."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # subgraph inputs from the outer scope
                for sub in list(attr.g.node if attr.HasField("g") else []) + \
                        [n for g in attr.graphs for n in g.node]:
                    needed.update(i for i in sub.input if i)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(reversed(keep))
    used = needed | {o.name for o in graph.output}
    initializers = [t for t in graph.initializer if t.name in used]
    if len(initializers) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(initializers)
    value_info = [v for v in graph.value_info if v.name in used]
    del graph.value_info[:]
    graph.value_info.extend(value_info)


def _shapes_after_cast(model) -> None:
    """Shape nodes reading a uint8 graph input read the Cast of it instead (same shape): TensorRT
    takes a uint8 network input only straight into a Cast (the exporter takes the symbolic sizes
    from the input itself)."""
    graph = model.graph
    for value in graph.input:
        if value.type.tensor_type.elem_type != 2:  # UINT8
            continue
        casts = [n for n in graph.node if n.op_type == "Cast" and n.input[0] == value.name]
        if not casts:
            continue
        for node in graph.node:
            if node.op_type == "Shape" and node.input[0] == value.name:
                node.input[0] = casts[0].output[0]
    _toposort(graph)


def _toposort(graph) -> None:
    """Order the nodes so every input is produced before it is used (original order otherwise)."""
    import heapq

    nodes = list(graph.node)
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    waiting, users = [], {}
    for i, n in enumerate(nodes):
        missing = {x for x in n.input if x not in available}
        waiting.append(len(missing))
        for x in missing:
            users.setdefault(x, []).append(i)
    heap = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        i = heapq.heappop(heap)
        order.append(i)
        for o in nodes[i].output:
            for j in users.pop(o, []):
                waiting[j] -= 1
                if waiting[j] == 0:
                    heapq.heappush(heap, j)
    if len(order) != len(nodes):
        raise RuntimeError("graph has a cycle or an input nobody produces")
    if order != sorted(order):
        copies = []
        for i in order:
            c = type(nodes[i])()
            c.CopyFrom(nodes[i])
            copies.append(c)
        del graph.node[:]
        graph.node.extend(copies)


def _convert_opset(model, opset: int):
    """Down-convert an opset-18 graph to `opset` (17) with ONNX's converter + the attribute fix."""
    import onnx
    from onnx import version_converter

    converted = version_converter.convert_version(model, opset)
    for node in converted.graph.node:
        if node.op_type.startswith("Reduce") and node.op_type != "ReduceSum":
            # Reduce*-13 (the opset <= 17 form) has axes as an attribute and no noop_with_empty_axes;
            # the converter moves axes but keeps the flag. It only matters for empty axes.
            for attr in list(node.attribute):
                if attr.name == "noop_with_empty_axes":
                    axes = [a for a in node.attribute if a.name == "axes"]
                    if onnx.helper.get_attribute_value(attr) and not (axes and list(axes[0].ints)):
                        raise RuntimeError(f"cannot convert {node.op_type} node {node.name!r} "
                                           f"(noop_with_empty_axes=1 without axes) to opset {opset}")
                    node.attribute.remove(attr)
    return converted


def _check(model, name: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise RuntimeError(f"{name}: exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None


def _opset_of(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _simplify(model, name: str, log):
    """onnxslim on one graph; returns the model to keep (the original if nothing improves)."""
    try:
        import onnxslim
    except ImportError:
        raise UserError("--simplify needs the Python package 'onnxslim' (pip install onnxslim)") from None
    before = len(model.graph.node)
    try:
        with _quiet():
            slim = onnxslim.slim(model)
    except Exception as e:  # noqa: BLE001 - a failed optional pass keeps the exported graph
        log(f"  {name}: onnxslim failed ({type(e).__name__}: {str(e)[:120]}); graph kept as exported")
        return model
    after = len(slim.graph.node)
    if after >= before:
        log(f"  {name}: onnxslim {before} -> {after} nodes; graph kept as exported")
        return model
    log(f"  {name}: onnxslim {before} -> {after} nodes")
    return slim


# ----------------------------------------------------------------------------------------------
# fused graph: backbone + stages joined in ONNX
# ----------------------------------------------------------------------------------------------

def _interface_dims(model) -> set:
    """The symbolic dims of a graph's inputs and outputs (T, H4, W4, ...)."""
    return {d.dim_param for v in list(model.graph.input) + list(model.graph.output)
            for d in v.type.tensor_type.shape.dim if d.dim_param}


def compose_fused(backbone, stages: list, mask_head, inputs: list, outputs: list):
    """model.onnx from the post-processed backbone, stage and last mask-head models (same opset)."""
    import onnx
    from onnx import helper

    opset = _opset_of(backbone)
    graph = helper.make_graph([], "efficientvis_fused", [], [])
    graph.node.extend(backbone.graph.node)
    graph.initializer.extend(backbone.graph.initializer)
    graph.value_info.extend(backbone.graph.value_info)
    graph.input.extend(backbone.graph.input)
    last = len(stages) - 1
    parts = []  # (model, tensor-name prefix, renamed tensors)
    for k, stage in enumerate(stages):
        rename = {n: n for n in G.FEATURES}
        if k == 0:
            rename.update({n: n for n in G.CLIP_START_INPUTS})
        else:
            rename.update(queries_in=f"stage_{k - 1}/queries", proposals_in=f"stage_{k - 1}/proposals")
        if k == last:
            rename.update({n: n for n in G.FUSED_OUTPUTS if n != "mask_probs"})
        parts.append((stage, f"stage_{k}/", rename))
    parts.append((mask_head, f"mask_{last}/", {**{n: n for n in G.FEATURES}, "proposals": "proposals",
                                               "attended": f"stage_{last}/attended",
                                               "mask_probs": "mask_probs"}))
    for part, prefix, rename in parts:
        if _opset_of(part) != opset or part.functions or backbone.functions:
            raise RuntimeError("cannot fuse graphs of different opsets or with local functions")

        def name(n, rename=rename, prefix=prefix):
            return rename.get(n, prefix + n) if n else n

        for node in part.graph.node:
            if any(a.HasField("g") or len(a.graphs) for a in node.attribute):
                raise RuntimeError(f"cannot fuse: node {node.name} has a subgraph")
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.name = prefix + node.name
            del new.input[:]
            new.input.extend(name(i) for i in node.input)
            del new.output[:]
            new.output.extend(name(o) for o in node.output)
            graph.node.append(new)
        for tensor in part.graph.initializer:
            new = onnx.TensorProto()
            new.CopyFrom(tensor)
            new.name = name(tensor.name)
            graph.initializer.append(new)
        interface = _interface_dims(part)
        for value in part.graph.value_info:
            new = onnx.ValueInfoProto()
            new.CopyFrom(value)
            new.name = name(value.name)
            for dim in new.type.tensor_type.shape.dim:
                # a graph's own symbols (u0: a NonZero's count, unk__N) are its own: shared by two
                # stages ONNX Runtime takes them for one size and fails to reuse a buffer
                if dim.dim_param and not set(re.findall(r"[A-Za-z_]\w*", dim.dim_param)) <= interface:
                    dim.dim_param = prefix + dim.dim_param
            graph.value_info.append(new)
    graph.input.extend(v for v in stages[0].graph.input if v.name in G.CLIP_START_INPUTS)
    by_name = {v.name: v for v in list(stages[-1].graph.output) + list(mask_head.graph.output)}
    graph.output.extend(by_name[n] for n in G.FUSED_OUTPUTS)
    model = helper.make_model(graph, opset_imports=list(backbone.opset_import),
                              producer_name=backbone.producer_name, producer_version=backbone.producer_version)
    model.ir_version = backbone.ir_version
    _prune(model)
    _set_io_shapes(model, inputs, outputs)
    return model


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines and warnings (torchvision missing, version conversion
    attempts, deprecations) are not the user's business; errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "torch._export",
                                              "torch.__trace", "onnxscript", "onnx_ir",
                                              "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _example_inputs(name, cfg_model, T, H, W, torch):
    """Trace-time inputs of a graph (values do not matter: torch.export traces with fake tensors)."""
    C, N = cfg_model.hidden_dim, cfg_model.num_queries
    gen = torch.Generator().manual_seed(0)
    features = tuple(torch.randn(T, C, -(-H // s), -(-W // s), generator=gen) for s in G.STRIDES)
    if name == "backbone":
        return (torch.randint(0, 256, (T, 3, H, W), dtype=torch.uint8, generator=gen),)
    if name == "stage_0":
        return features + (torch.randn(N, C, generator=gen), torch.tensor([float(H), float(W)]),
                           (torch.arange(N) % 2).float(), torch.tensor([0.2 * W, 0.1 * H, 0.5 * W, 0.6 * H]).repeat(N, 1))
    boxes = torch.tensor([0.1 * W, 0.1 * H, 0.6 * W, 0.7 * H]).expand(N, T, 4).contiguous()
    return features + (torch.randn(N, T, C, generator=gen), boxes)


def _dynamic_shapes(name, axes, max_clip, torch):
    Dim = torch.export.Dim
    T = Dim("T", min=1, max=max_clip) if max_clip > 1 else None
    tdim = {0: T} if T is not None else {}

    def feature(s):
        return {**tdim, 2: Dim(f"H{s}", min=axes[f"H{s}"]["min"], max=axes[f"H{s}"]["max"]),
                3: Dim(f"W{s}", min=axes[f"W{s}"]["min"], max=axes[f"W{s}"]["max"])}

    if name == "backbone":
        return {"frames": {**tdim, 2: Dim("H", min=axes["H"]["min"], max=axes["H"]["max"]),
                           3: Dim("W", min=axes["W"]["min"], max=axes["W"]["max"])}}
    shapes = {f: feature(s) for f, s in zip(G.FEATURES, G.STRIDES)}
    tq = {1: T} if T is not None else {}
    if name == "stage_0":
        shapes.update({n: None for n in G.CLIP_START_INPUTS})
    elif name.startswith("mask_"):
        shapes.update(attended=dict(tq), proposals=dict(tq))
    else:
        shapes.update(queries_in=dict(tq), proposals_in=dict(tq))
    return shapes


def _trace_size(axes):
    """Frame size to trace at: inside the ranges, every feature map at least 2 x 2 (sizes 0/1 would
    be specialised) and H != W."""
    h = min(max(axes["H"]["opt"], 64), axes["H"]["max"])
    w = min(max(axes["W"]["opt"], 64), axes["W"]["max"])
    if w == h:
        w = w - 32 if w - 32 >= max(64, axes["W"]["min"]) else min(w + 32, axes["W"]["max"])
    return h, w


def export_graph(model, name, roi_form, opset, axes, max_clip, spec, torch):
    """One graph -> post-processed, checked onnx.ModelProto (in memory)."""
    from efficientvis.training import roi_align

    module = G.build_graph_module(model, name)
    h, w = _trace_size(axes)
    args = _example_inputs(name, model.cfg, max_clip, h, w, torch)
    input_names, output_names = G.graph_io_names(name)
    with roi_align.export_mode(roi_form), _quiet(), torch.no_grad():
        try:
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=max(opset, EXPORTER_MIN_OPSET),
                input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=_dynamic_shapes(name, axes, max_clip, torch),
                custom_translation_table=roi_align.ONNX_TRANSLATION_TABLE, optimize=True, verbose=False)
        except Exception as e:
            raise RuntimeError(f"{name}: torch.onnx.export failed: {type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0][:300]}") from e
    onnx_model = program.model_proto
    if opset < EXPORTER_MIN_OPSET:
        onnx_model = _convert_opset(onnx_model, opset)
    if onnx_model.functions:
        raise RuntimeError(f"{name}: exported graph has local functions {[f.name for f in onnx_model.functions]}")
    _set_io_shapes(onnx_model, *spec)
    _shapes_after_cast(onnx_model)
    _prune(onnx_model)
    onnx_model.doc_string = f"EfficientVIS {name} (efficientvis {__version__}, roi_align={roi_form})"
    return onnx_model


def save_graph(onnx_model, model_dir, file_name) -> dict:
    """Write one graph (external data when large) -> manifest entry {file, sha256, bytes, external_data}."""
    import onnx

    weights = sum(len(t.raw_data) for t in onnx_model.graph.initializer)
    path = os.path.join(model_dir, file_name)
    if weights > EXTERNAL_DATA_BYTES:
        data_name = file_name + ".data"
        onnx.save_model(onnx_model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        extra = [manifest_lib.file_entry(model_dir, data_name)]
    else:
        onnx.save_model(onnx_model, path)
        extra = []
    onnx.checker.check_model(path, full_check=True)
    return {**manifest_lib.file_entry(model_dir, file_name), "external_data": extra}


# ----------------------------------------------------------------------------------------------
# verification: ONNX Runtime vs PyTorch at another clip length and frame size
# ----------------------------------------------------------------------------------------------

def verification_shape(axes):
    """A clip length and frame size other than the traced ones (odd sizes: the ceil paths)."""
    T = max(1, min(axes["T"]["max"] - 1, 3))
    h, w = _trace_size(axes)
    H = max(axes["H"]["min"], min(axes["H"]["max"], (h * 3) // 4 + 3))
    W = max(axes["W"]["min"], min(axes["W"]["max"], (w * 3) // 4 + 5))
    return T, H, W


def clip_start(init_queries, frames, carried=None):
    """stage_0's clip-start inputs (numpy) for a clip of `frames` (T, 3, H, W): `carried` as the
    clip loop's backends take it (runtime/clip_loop.py), None for none."""
    return {"init_queries": np.ascontiguousarray(init_queries, np.float32),
            **clip_start_inputs(frames.shape[-2:], carried, len(init_queries))}


def torch_reference(model, frames, start, roi_form, num_stages=None):
    """What each graph should output, computed by the PyTorch wrappers of graphs.py, and the inputs
    to give it: ({graph: {output: ndarray}}, {graph: {input: ndarray}}). `start`: stage_0's
    clip-start inputs (`clip_start`). Stage k is fed PyTorch's stage k-1 outputs, mask head k
    stage k's; "model" is the whole clip."""
    import torch
    from efficientvis.training import roi_align

    device = next(model.parameters()).device  # `evis parity --device cuda`: the model is on the GPU

    def tensor(array):
        return torch.as_tensor(array, device=device)

    def numpy(t):
        return t.cpu().numpy()

    out, feeds = {}, {}
    with torch.no_grad(), roi_align.export_mode(roi_form):
        feats = G.build_graph_module(model, "backbone")(tensor(frames))
        feeds["backbone"] = {"frames": frames}
        out["backbone"] = fd = {n: numpy(f) for n, f in zip(G.FEATURES, feats)}
        q = boxes = None
        for k in range(num_stages or len(model.iterations)):
            name = f"stage_{k}"
            module = G.build_graph_module(model, name)
            if k == 0:
                res = module(*feats, *(tensor(start[n]) for n in G.CLIP_START_INPUTS))
                feeds[name] = {**fd, **start}
            else:
                res = module(*feats, q, boxes)
                feeds[name] = {**fd, "queries_in": numpy(q), "proposals_in": numpy(boxes)}
            out[name] = {n: numpy(r) for n, r in zip(G.STAGE_OUTPUTS, res)}
            q, boxes = res[0], res[1]
            mask = f"mask_{k}"
            feeds[mask] = {**fd, "attended": out[name]["attended"], "proposals": out[name]["proposals"]}
            out[mask] = {"mask_probs": numpy(G.build_graph_module(model, mask)(*feats, res[3], res[1]))}
    out["model"] = {**{n: out[name][n] for n in G.FUSED_OUTPUTS if n != "mask_probs"}, **out[mask]}
    feeds["model"] = {"frames": frames, **start}
    return out, feeds


def max_errors(got: dict, ref: dict) -> dict:
    return {n: float(np.abs(got[n].astype(np.float64) - ref[n]).max()) if ref[n].size else 0.0
            for n in ref}


def _tolerance(ref) -> float:
    return VERIFY_ATOL + VERIFY_RTOL * float(np.abs(ref).max(initial=0))


def verify_export(model, model_dir, graph_entries, roi_form, axes, log):
    """Every graph in ONNX Runtime (CPU) at another T, H, W than traced. The backbone and each stage
    are compared with PyTorch on the same inputs; the fused graph with the split graphs run in
    sequence in ONNX Runtime (end to end, float32 rounding of an untrained model's chain of stages
    can be amplified without bound: boxes of thousands of pixels change FPN level; that number is
    recorded, not judged). Returns the manifest's `verification`."""
    import onnxruntime as ort

    T, H, W = verification_shape(axes)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (T, 3, H, W), dtype=np.uint8)
    init_queries = model.init_queries.weight.detach().float().numpy().copy()
    # every other slot starts from a carried box (both paths of stage_0's proposals are checked)
    N = len(init_queries)
    corner = rng.uniform(0, 0.5, (N, 2)) * (W, H)
    carried = (np.arange(N) % 2 == 0, np.concatenate([corner, corner + rng.uniform(0.1, 0.5, (N, 2)) * (W, H)], 1))
    ref, feeds = torch_reference(model, frames, clip_start(init_queries, frames, carried), roi_form)
    options = ort.SessionOptions()
    options.log_severity_level = 3

    def run(name, inputs):
        session = ort.InferenceSession(os.path.join(model_dir, graph_entries[name]["file"]), options,
                                       providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))

    errors, failed, got = {}, [], {}
    split = [n for n in graph_entries if n != "model"]
    for name in split:
        got[name] = run(name, feeds[name])
        errors[name] = max_errors(got[name], ref[name])
        failed += [f"{graph_entries[name]['file']} output {o}: max abs error {e:.3g} > "
                   f"{_tolerance(ref[name][o]):.3g}" for o, e in errors[name].items()
                   if not e <= _tolerance(ref[name][o])]
    result = {"T": T, "H": H, "W": W, "provider": "CPUExecutionProvider",
              "reference": f"PyTorch ({roi_form} form) on the same inputs"}
    if "model" in graph_entries:
        stages = [n for n in split if n.startswith("stage_")]
        chain = run(stages[0], {**got["backbone"], **{k: feeds["model"][k] for k in G.CLIP_START_INPUTS}})
        for name in stages[1:]:
            chain = run(name, {**got["backbone"], "queries_in": chain["queries"], "proposals_in": chain["proposals"]})
        chain.update(run(f"mask_{len(stages) - 1}", {**got["backbone"], "attended": chain["attended"],
                                                     "proposals": chain["proposals"]}))
        fused = run("model", feeds["model"])
        errors["model"] = max_errors(fused, {n: chain[n] for n in G.FUSED_OUTPUTS})
        failed += [f"model.onnx output {o}: differs from the split graphs by {e:.3g}"
                   for o, e in errors["model"].items() if not e <= _tolerance(chain[o])]
        result["model_reference"] = "the split graphs run in sequence in ONNX Runtime"
        result["model_end_to_end_vs_pytorch"] = max_errors(fused, ref["model"])
    worst = max(e for g in errors.values() for e in g.values())
    log(f"verified in ONNX Runtime at T={T}, {H}x{W}: max abs error {worst:.2e}")
    if failed:
        raise UserError("exported graphs differ from PyTorch: " + "; ".join(failed))
    result["max_abs_error"] = errors
    return result


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------

def _category_ids(checkpoint_path, K):
    import torch

    try:
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
        ids = ckpt.get("category_ids") if isinstance(ckpt, dict) else None
    except Exception:  # noqa: BLE001 - load_model already accepted the file; ids are optional
        ids = None
    if ids is None:
        return list(range(1, K + 1))
    ids = [int(i) for i in ids]
    if len(ids) != K:
        raise UserError(f"checkpoint {checkpoint_path}: {len(ids)} category_ids for {K} classes")
    return ids


def export_model(checkpoint, out_dir, roi_form="roialign", fused=False, opset=DEFAULT_OPSET,
                 max_clip=None, min_size=MIN_SIZE, max_size=None, simplify=False, verify=True,
                 log=print) -> dict:
    """Export a checkpoint to MODEL_DIR; returns the manifest dict (also written to disk)."""
    from efficientvis.training.infer import inference_clip_length, load_model

    if roi_form not in ROI_FORMS:
        raise UserError(f"--roi-align must be one of {', '.join(ROI_FORMS)}, got {roi_form!r}")
    if opset == 16:
        raise UserError("--opset 16 is not possible: the model's LayerNormalization needs opset 17 "
                        "(RoiAlign's half_pixel mode needs >= 16); use 17 (default) .. 20")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET} (TensorRT 10.x parses opsets "
                        f"up to 20), got {opset}")
    model, cfg, class_names = load_model(checkpoint, "cpu")
    if cfg.model.carry_proposals and not 0.0 <= cfg.model.carry_threshold <= 1.0:
        raise UserError(f"checkpoint {checkpoint}: model.carry_threshold must be in [0, 1], "
                        f"got {cfg.model.carry_threshold}")
    K = cfg.model.num_classes
    max_clip = inference_clip_length(cfg) if max_clip is None else int(max_clip)
    if max_clip < 1:
        raise UserError(f"--max-clip must be >= 1, got {max_clip}")
    max_size = int(max_size or cfg.data.max_size or max(640, cfg.data.test_size))
    min_size = int(min_size)
    if not MIN_SIZE <= min_size <= max_size:
        raise UserError(f"--min-size must be in {MIN_SIZE}..--max-size ({max_size}), got {min_size}")
    if max_size < cfg.data.test_size:
        raise UserError(f"--max-size {max_size} is below the model's test size {cfg.data.test_size}")
    class_names = list(class_names) if class_names else [f"class_{k}" for k in range(1, K + 1)]
    if len(class_names) != K:
        raise UserError(f"checkpoint {checkpoint}: {len(class_names)} class names for {K} classes")
    category_ids = _category_ids(checkpoint, K)
    axes = axis_ranges(max_clip, cfg.data.test_size, max_size, min_size)

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} is a file; give a folder")
    os.makedirs(out_dir, exist_ok=True)
    # everything is written to a staging folder inside out_dir (same file system) and moved into
    # place at the end: an export that fails or is interrupted leaves the previous one as it was
    for stale in os.listdir(out_dir):  # left by an export that was killed (SIGKILL, power)
        if stale.startswith(STAGING_PREFIX) and os.path.isdir(os.path.join(out_dir, stale)):
            shutil.rmtree(os.path.join(out_dir, stale), ignore_errors=True)
    final_dir, out_dir = out_dir, tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir)
    try:
        return _export_into(model, cfg, checkpoint, out_dir, final_dir, roi_form, fused, opset, simplify,
                            verify, max_clip, max_size, min_size, class_names, category_ids, axes, log)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _publish(staging, out_dir):
    """The staged export replaces the one in out_dir: the old manifest goes first (a folder caught
    half way has none, so nothing loads it), the new files replace the old ones, the old export's
    files the new one lacks go, and the new manifest comes last. Other files in out_dir stay."""
    manifest = os.path.join(out_dir, manifest_lib.FILENAME)
    if os.path.exists(manifest):
        os.unlink(manifest)
    new = set(os.listdir(staging))
    for n in sorted(new - {manifest_lib.FILENAME}):
        os.replace(os.path.join(staging, n), os.path.join(out_dir, n))
    for n in os.listdir(out_dir):
        if n not in new and OWN_FILES.match(n) and os.path.isfile(os.path.join(out_dir, n)):
            os.unlink(os.path.join(out_dir, n))
    os.replace(os.path.join(staging, manifest_lib.FILENAME), manifest)


def _export_into(model, cfg, checkpoint, out_dir, final_dir, roi_form, fused, opset, simplify, verify,
                 max_clip, max_size, min_size, class_names, category_ids, axes, log):
    """export_model's work, written into the staging folder out_dir."""
    import onnx
    import torch

    mc = cfg.model
    N, C, K, M = mc.num_queries, mc.hidden_dim, mc.num_classes, mc.num_iterations
    mask_size = 2 * mc.mask_pooler_size
    log(f"exporting {checkpoint} -> {final_dir} (opset {opset}, RoIAlign as "
        f"{ROI_FORMS[roi_form]}, T 1..{max_clip}, "
        f"H/W {min_size}..{max_size})")
    names = G.split_names(M)
    protos, entries, started = {}, {}, time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        spec = graph_spec(name, N, C, K, mask_size)
        try:
            proto = export_graph(model, name, roi_form, opset, axes, max_clip, spec, torch)
        except RuntimeError as e:
            raise UserError(f"export of {name} failed: {e}") from e
        if simplify:
            proto = _simplify(proto, name, log)
        protos[name] = proto
        entry = save_graph(proto, out_dir, f"{name}.onnx")
        seconds = time.perf_counter() - t0
        entries[name] = {**entry, "inputs": spec[0], "outputs": spec[1],
                         "nodes": len(proto.graph.node), "export_seconds": round(seconds, 2)}
        log(f"  {name + '.onnx':<16} {seconds:7.1f} s  {entry['bytes'] / 2**20:8.1f} MB  "
            f"{len(proto.graph.node):5d} nodes")
    if fused:
        t0 = time.perf_counter()
        spec = graph_spec("model", N, C, K, mask_size)
        proto = compose_fused(protos["backbone"], [protos[s] for s in G.stage_names(M)], protos[f"mask_{M - 1}"],
                              *spec)
        _check(proto, "model.onnx")
        entry = save_graph(proto, out_dir, "model.onnx")
        seconds = time.perf_counter() - t0
        entries["model"] = {**entry, "inputs": spec[0], "outputs": spec[1],
                            "nodes": len(proto.graph.node), "export_seconds": round(seconds, 2)}
        log(f"  {'model.onnx':<16} {seconds:7.1f} s  {entry['bytes'] / 2**20:8.1f} MB  "
            f"{len(proto.graph.node):5d} nodes (fused)")
    del protos

    q_star = model.init_queries.weight.detach().float().numpy().astype(np.float32)
    np.save(os.path.join(out_dir, "initial_queries.npy"), q_star)
    q_entry = {**manifest_lib.file_entry(out_dir, "initial_queries.npy"), "dtype": "float32",
               "shape": [N, C]}

    verification = verify_export(model, out_dir, entries, roi_form, axes, log) if verify else None
    backbone = model.backbone
    data = {
        "format": manifest_lib.FORMAT, "format_version": manifest_lib.FORMAT_VERSION,
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exporter": {"torch": torch.__version__, "onnx": onnx.__version__},
        "opset": opset, "roi_align": roi_form,
        "T": max_clip, "trained_clip_length": mc.clip_length, "N": N, "C": C, "M": M, "K": K,
        "mask_size": mask_size,
        "class_names": class_names, "category_ids": category_ids,
        "preprocessing": {
            "dtype": "uint8", "layout": "T3HW", "colour": "RGB", "value_range": [0, 255],
            "normalisation": {"where": "inside_graph", "formula": "(x - mean) / std",
                              "mean": [round(float(v), 6) for v in backbone.pixel_mean.flatten()],
                              "std": [round(float(v), 6) for v in backbone.pixel_std.flatten()]},
            # the model's rule; a smaller --max-size (graphs declared for less) caps it
            "resize": "shortest_side", "test_size": cfg.data.test_size,
            "max_size": min(cfg.data.max_size, max_size) if cfg.data.max_size else max_size,
            "interpolation": "bilinear",
            "rule": "shortest side -> test_size; if the longer side then exceeds max_size, scale so it "
                    "equals max_size; round half up (ytvis.clips.resized_shape)",
        },
        "infer": dict(vars(cfg.infer)),
        # a model trained with model.carry_proposals: the clip loop's rule for stage_0's carried inputs
        "carry_threshold": float(mc.carry_threshold) if mc.carry_proposals else None,
        "dynamic_axes": axes,
        "stages": G.stage_names(M),
        "mask_heads": G.mask_head_names(M),
        "graphs": entries,
        "initial_queries": q_entry,
        "model": {"config": cfg.name, "backbone": mc.backbone, "backbone_width": mc.backbone_width,
                  "num_heads": mc.num_heads, "pooler_size": mc.pooler_size,
                  "mask_pooler_size": mc.mask_pooler_size, "sampling_ratio": mc.sampling_ratio,
                  "attention": mc.attention, "dynamic_conv": mc.dynamic_conv,
                  "time_shared_queries": mc.time_shared_queries, "init_boxes": mc.init_boxes,
                  "checkpoint": os.path.basename(checkpoint)},
        "export_seconds": round(time.perf_counter() - started, 2),
    }
    if verification is not None:
        data["verification"] = verification
    manifest_lib.write(out_dir, data)
    _publish(out_dir, final_dir)
    log(f"wrote {final_dir}/manifest.json ({len(entries)} graphs, export {data['export_seconds']:.1f} s)")
    return data


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="checkpoint (.pt) written by evis train")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="folder to write the graphs to")
    p.add_argument("--roi-align", default="roialign", choices=list(ROI_FORMS),
                   help="RoIAlign as one ONNX RoiAlign node per FPN level (TensorRT plugin "
                        "ROIAlign_TRT), as plugin-free GridSample, or grouped: each RoI pooled on its "
                        "own level only (ONNX Runtime only, not TensorRT; fastest on CPU) "
                        "(default: roialign)")
    p.add_argument("--fused", action="store_true", help="also write model.onnx (backbone + all stages)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    p.add_argument("--max-clip", type=int, default=None, metavar="T",
                   help="longest clip the graphs accept, the runtime's default clip (default: the "
                        "config's infer.clip_length, else the trained clip length)")
    p.add_argument("--min-size", type=int, default=MIN_SIZE, help=f"smallest frame side (default {MIN_SIZE})")
    p.add_argument("--max-size", type=int, default=None,
                   help="largest frame side (default: the config's data.max_size)")
    p.add_argument("--simplify", action="store_true", help="onnxslim pass (needs onnxslim)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the ONNX Runtime vs PyTorch check of every graph")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")


def run(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    export_model(args.checkpoint, args.out, roi_form=args.roi_align, fused=args.fused, opset=args.opset,
                 max_clip=args.max_clip, min_size=args.min_size, max_size=args.max_size,
                 simplify=args.simplify, verify=not args.no_verify,
                 log=lambda m: print(m, flush=True))
    return 0

