"""Q/DQ INT8 models with ONNX Runtime's static quantization, in the form TensorRT takes.

`quantize_graph` runs `onnxruntime.quantization.quantize_static` on one FP32 graph:
QuantFormat.QDQ, QInt8 activations and weights, per-channel weights, symmetric activations and
weights (`ActivationSymmetric`, `WeightSymmetric`: zero point 0, the only one TensorRT accepts),
float biases (`QuantizeBias=False`: TensorRT's DequantizeLinear takes INT8, not the INT32 a
quantized bias would need), calibration MinMax | Entropy (KL divergence over 2048-bin histograms:
`entropy_cache`) | Percentile (99.999) over recorded inputs (calibration/data.py). Then three fixes on ONNX Runtime's output:

- graph outputs are the float tensors again (`float_graph_outputs`): ONNX Runtime makes a
  quantized graph output the DequantizeLinear of it, so the features p2..p5 handed to the stages
  and the queries carried to the next clip would be int8-rounded, and tensor names would differ
  from the FP32 graph (the TensorRT calibration cache is keyed by them);
- inputs of excluded nodes are rewired to the float tensor in front of their QuantizeLinear
  (`float_inputs_for`), so an excluded node never reads a dequantized (rounded) value;
- every Q/DQ zero point is checked to be 0 (int8) and every scale constant, positive and finite
  (`check_qdq`); the TensorRT-readiness check (export/trt_check.py) runs in calibrate.py.

Default exclusions (`select_exclusions`), each a node name with its reason:
- op types that stay float: RoiAlign, GridSample (TensorRT runs them FP32/FP16 only), Softmax,
  LayerNormalization (normalisation statistics and attention weights lose most from 8 bits);
- attention-score MatMuls: the Q.K^T MatMul feeding a Softmax and the weights.V MatMul reading
  one (both operands computed, per-tensor scales of a few outliers);
- the output heads (`head_producers`): the class and box MLPs whole (from where they leave the
  shared queries to `class_logits` / the box deltas of `proposals`: cheap N x T x C layers whose
  error goes straight into scores and into the boxes the next stage pools from -- measured: the
  box MLP alone moved mask logits by 60-80 % of their range through the RoI shift) and the mask
  predictor (last layer before the mask logits, whose sigmoid is `mask_probs`; the mask head's 3x3 convs, most of a stage's
  compute, stay INT8: each moved the masks by < 1 %).
Op types quantized (`op_types_for`): in the backbone every op type ONNX Runtime can quantize (the
residual and FPN Adds, ReLUs, MaxPool, Resize, ...), so that every conv reads and writes int8;
in the mask graphs Conv, ConvTranspose, Gemm, MatMul (weighted layers: where INT8 kernels exist
in TensorRT and ONNX Runtime); the stage graphs stay FP32 unless `quantize_stages` (their
weighted layers are matrix products over N x T tokens, too small to gain from int8: at the r50
size a stage ran 1.36x slower in INT8 than in FP32 on ONNX Runtime's CPU provider, 120 against
88 ms, while the mask head gained 1.6x; docs/benchmarks.md). Outputs are quantized too, as ONNX Runtime does by
default. In the backbone every consumer gets a Q/DQ pair of its own (`DedicatedQDQPair`,
`dedicated_pairs_for`): ONNX Runtime's CPU provider then fuses DQ-Conv-Q into QLinearConv wherever
a conv's output has one reader, provided the session runs without common-subexpression
elimination, which merges the pairs again (recorded in the manifest for the runtime). Only the top
FPN lateral conv, read by the P5 output conv and by the upsampling, stays float. Before (weighted layers only, shared pairs), the convs reading a residual
sum kept a float Conv behind a runtime DequantizeLinear of their weights: 27 of ResNet-50 + FPN's
61 convs, and the INT8 backbone was slower than FP32 (r50 size, 360x640, T = 9: 2.7 s against
2.4 s; now 60 of 61 fused, 1.3 s). `quantize_all=True` quantizes every op type ONNX Runtime can in
every graph, stages included, with no exclusion (the comparison point).

ONNX Runtime's CPU form (`cpu_dst`, `cpu_form_for`: the backbone): the same graph quantized again
from the same recorded inputs with asymmetric uint8 activations (int8 per-channel symmetric
weights as before), ONNX Runtime's native x86 form. A symmetric int8 tensor cannot express a
Relu, so the TensorRT form keeps every Relu in float between a DequantizeLinear and a
QuantizeLinear (49 at r50: with their Q/DQ, 0.47 s of a 1.07 s INT8 backbone); with uint8 and zero
point 0 the quantizer folds each Relu into the QuantizeLinear before it, a default session fuses
all 61 convs into QLinearConv (no dedicated pairs needed) and the backbone takes 0.59 s, 3.4x FP32.
TensorRT takes only the symmetric form (zero point 0, int8), so both are written, from one pass
of the recorded inputs (the ranges go into a calibration cache that the second form reads); the
runtime picks the CPU form on ONNX Runtime's CPU provider. `check_qdq` checks the CPU form's
scales, not its zero points.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections import Counter

import numpy as np

from efficientvis.errors import UserError

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_METHOD = "minmax"
DEFAULT_EXCLUDED_OP_TYPES = ("RoiAlign", "GridSample", "Softmax", "LayerNormalization")
DEFAULT_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ALL_OP_TYPES = None  # quantize_static's op_types_to_quantize: every op type it can quantize
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
HEAD_OUTPUTS = ("class_logits", "mask_probs", "proposals")
BRANCH_OUTPUTS = ("class_logits", "proposals")  # small MLPs: excluded whole
_BRANCH_OPS = {"Relu", "LayerNormalization", "Gelu", "Sigmoid"}
# ops an output head's value passes through between its weighted layer and the graph output
_PASS_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Slice",
                 "Gather", "Concat", "Split", "Cast", "Add", "Sub", "Mul", "Div", "Exp", "Log",
                 "Clip", "Min", "Max", "Expand", "Tile", "Where", "Sigmoid", "Neg", "Abs", "Sqrt"}
# ops between an attention-score MatMul and its Softmax (scaling, masking, layout)
_SCORE_OPS = {"Mul", "Div", "Add", "Where", "Reshape", "Transpose", "Cast", "Identity", "Dropout"}
PERCENTILE = 99.999
# Entropy calibration: ONNX Runtime's histogram spans [-t, t] and its KL search squeezes a
# two-sided slice into the quantized bins. 2048 bins into 128 levels (64 per side, ~7 bits) is what
# is used: measured on the tiny model, ΔAP -0.006. The literal analogue of TensorRT's 2048 bins of
# |x| into 128 levels, 4096 bins into 255 levels here, clipped one-sided (post-ReLU) tensors to 1/16
# of their maximum, and the INT8 model's AP fell from 0.081 to 0.000 (docs/benchmarks.md).
ENTROPY_BINS = 2048
ENTROPY_QUANTIZED_BINS = 128
RENAMED_OUTPUT = "_QuantizeLinear_Input"  # ONNX Runtime's name for a quantized graph output's source


def _method(name):
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}
    if name not in table:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {name!r}")
    return table[name]


class _Graph:
    def __init__(self, model):
        g = model.graph
        self.nodes = list(g.node)
        self.initializers = {t.name for t in g.initializer}
        self.constants = set(self.initializers) | {n.output[0] for n in g.node if n.op_type == "Constant"}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.outputs = [o.name for o in g.output]

    def is_constant(self, name):
        if name in self.constants:
            return True
        p = self.producer.get(name)  # a weight behind a Transpose/Reshape of a constant
        return p is not None and p.op_type in ("Transpose", "Reshape", "Cast", "Identity") and \
            all(self.is_constant(i) for i in p.input if i)

    def weighted(self, node):
        """A Conv/Gemm/MatMul with a constant weight operand."""
        return node.op_type in WEIGHTED_OPS and len(node.input) > 1 and self.is_constant(node.input[1])


def _node_name(node):
    return node.name or node.output[0]


def attention_matmuls(graph: _Graph) -> list:
    """MatMuls whose operands are both computed and that feed a Softmax (scores) or read one
    (weights x values), through scaling/masking/layout ops only."""
    found = []
    for node in graph.nodes:
        if node.op_type != "MatMul" or any(graph.is_constant(i) for i in node.input[:2]):
            continue
        # forward to a Softmax
        frontier, seen, hit = [node.output[0]], set(), False
        for _ in range(6):
            nxt = []
            for t in frontier:
                for c in graph.consumers.get(t, []):
                    if c.op_type == "Softmax":
                        hit = True
                    elif c.op_type in _SCORE_OPS and id(c) not in seen:
                        seen.add(id(c))
                        nxt += [o for o in c.output if o]
            frontier = nxt
        # backward to a Softmax
        for t in node.input[:2]:
            for _ in range(4):
                p = graph.producer.get(t)
                if p is None:
                    break
                if p.op_type == "Softmax":
                    hit = True
                    break
                if p.op_type not in _SCORE_OPS - {"Add", "Where", "Mul", "Div"}:
                    break
                t = p.input[0]
        if hit:
            found.append(node)
    return found


def head_producers(graph: _Graph, outputs=HEAD_OUTPUTS, branches=BRANCH_OUTPUTS) -> dict:
    """{node name: output} of the weighted layers that produce the given graph outputs, found by
    walking back from each output through pass-through ops. For the outputs in `branches` the
    walk goes on through the head's own layers (weighted layers, activations, LayerNorms) up to
    the tensor where the head leaves the shared trunk (a tensor read by more than one node):
    the whole small MLP is excluded. For the others only the last weighted layer is."""
    found = {}
    for out in outputs:
        if out not in graph.outputs:
            continue
        whole = out in branches
        stack, seen = [out], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            p = graph.producer.get(t)
            if p is None:
                continue
            if graph.weighted(p):
                found.setdefault(_node_name(p), out)
                if whole and len(graph.consumers.get(p.input[0], [])) == 1:
                    stack.append(p.input[0])
                continue
            if p.op_type in _PASS_THROUGH or (whole and p.op_type in _BRANCH_OPS):
                stack += [i for i in p.input if i and not graph.is_constant(i)
                          and (not whole or p.op_type in _PASS_THROUGH or len(graph.consumers.get(i, [])) == 1)]
    return found


def op_types_for(graph_name, quantize_all=False, quantize_stages=False):
    """Op types quantized in one graph (None: all; empty: none, the graph stays FP32): the whole
    backbone, the weighted layers of the mask heads, nothing in the stages unless asked for
    (module docstring)."""
    if quantize_all or graph_name == "backbone":
        return ALL_OP_TYPES
    if graph_name.startswith("stage_") and not quantize_stages:
        return ()
    return DEFAULT_OP_TYPES


def dedicated_pairs_for(graph_name):
    """Whether every consumer of a tensor gets its own Q/DQ pair: in the backbone, where it lets
    ONNX Runtime fuse every conv, not in the stages (there the extra QuantizeLinear of a tensor
    read three times, e.g. by the attention's projections, made a stage 1.5x slower, measured at
    the r50 size), where no conv is in question."""
    return graph_name == "backbone"


def cpu_form_for(graph_name):
    """Whether a graph also gets ONNX Runtime's CPU form (uint8 activations): the backbone, where
    it runs 1.8x faster than the TensorRT form on ONNX Runtime's CPU provider at the r50 size
    (0.59 s against 1.07 s per 9-frame clip: no Relu between a DequantizeLinear and a
    QuantizeLinear, 61 of 61 convs fused) at the same AP on the tiny model. Not the mask heads:
    their CPU form was 1.2x faster (0.31 s against 0.37 s) but cost 0.009 AP on the tiny model
    (docs/benchmarks.md)."""
    return graph_name == "backbone"


# ONNX Runtime optimizers a graph written with dedicated Q/DQ pairs must run without: the
# common-subexpression elimination merges the pairs again (and the convs stay float). Recorded per
# graph in the manifest ("onnxruntime_disabled_optimizers"); the runtime reads it from there.
DEDICATED_PAIRS_DISABLED_OPTIMIZERS = ["CommonSubexpressionElimination"]


def select_exclusions(model, op_types=DEFAULT_EXCLUDED_OP_TYPES, extra=(), quantize_all=False,
                      attention=True, heads=True) -> dict:
    """{node name: reason} of the nodes of `model` (onnx ModelProto) that stay float.
    `extra`: more op types or node names (--exclude); a name that is neither is a UserError."""
    if quantize_all:
        return {}
    graph = _Graph(model)
    present = Counter(n.op_type for n in graph.nodes)
    names = {_node_name(n) for n in graph.nodes}
    excluded = {}
    for node in graph.nodes:
        if node.op_type in op_types:
            excluded[_node_name(node)] = f"op type {node.op_type}"
    if attention:
        for node in attention_matmuls(graph):
            excluded.setdefault(_node_name(node), "attention MatMul (Softmax)")
    if heads:
        for name, out in head_producers(graph).items():
            excluded.setdefault(name, f"output head ({out})")
    for item in extra:
        if item in present:
            for node in graph.nodes:
                if node.op_type == item:
                    excluded.setdefault(_node_name(node), f"op type {item} (--exclude)")
        elif item in names:
            excluded.setdefault(item, "--exclude")
    return excluded


def check_extra_exclusions(models: list, extra) -> None:
    """Every --exclude item must be an op type or a node name of at least one graph (or a known
    op type that these graphs simply lack, e.g. GridSample in the RoiAlign form)."""
    known = set(DEFAULT_EXCLUDED_OP_TYPES) | set(WEIGHTED_OPS)
    for item in extra:
        if item in known:
            continue
        if not any(item == n.op_type or item == _node_name(n) for m in models for n in m.graph.node):
            raise UserError(f"--exclude {item}: neither an op type nor a node name of these graphs")


# ----------------------------------------------------------------------------------------------

def preprocess(src, dst) -> dict:
    """The FP32 graph as ONNX Runtime's basic (level 1) optimizer leaves it: constants folded,
    FrozenBN's Mul/Add folded into the convs (279 -> 173 nodes in the R50 backbone), standard
    ONNX ops only. Quantizing the exported graph instead puts Q/DQ between each conv and its
    Mul/Add, which blocks the fusion: the INT8 model then runs slower than FP32 (measured). The
    unused opset imports ONNX Runtime adds are dropped. Returns {"nodes_before", "nodes_after"}."""
    import onnx
    import onnxruntime as ort

    before = len(onnx.load(src, load_external_data=False).graph.node)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = dst
    options.log_severity_level = 3
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])
    model = onnx.load(dst)
    used = {n.domain or "" for n in model.graph.node}
    keep = [o for o in model.opset_import if (o.domain or "") in used or (o.domain or "") in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    onnx.checker.check_model(model)
    onnx.save(model, dst)
    return {"nodes_before": before, "nodes_after": len(model.graph.node)}


@contextlib.contextmanager
def _quiet_logging():
    """ONNX Runtime's quantizer logs through the root logger (a warning per LayerNorm weight,
    a preprocessing hint): keep it to errors while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def entropy_cache(src, reader, op_types, cache_path) -> int:
    """Run ONNX Runtime's entropy (KL) calibrator with ENTROPY_BINS / ENTROPY_QUANTIZED_BINS over
    `reader` and save its ranges as a calibration cache (`save_tensors_data`) for quantize_static
    to use. quantize_static builds that calibrator itself with 128 bins for 128 quantized bins and
    takes no bin count, so its KL search had one candidate: the full range, as MinMax. Returns the
    number of tensors calibrated."""
    import inspect

    from onnxruntime.quantization import CalibrationMethod, create_calibrator, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise UserError("--method entropy needs an onnxruntime whose quantize_static takes "
                        "calibration_cache_path (1.32 is tested); use minmax or percentile")
    augmented = cache_path + ".augmented.onnx"
    calibrator = create_calibrator(src, op_types, augmented_model_path=augmented,
                                   calibrate_method=CalibrationMethod.Entropy,
                                   extra_options={"symmetric": True, "num_bins": ENTROPY_BINS,
                                                  "num_quantized_bins": ENTROPY_QUANTIZED_BINS})
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress and bin counts
            calibrator.collect_data(reader)
            data = calibrator.compute_data()
    finally:
        del calibrator
        if os.path.exists(augmented):
            os.unlink(augmented)
    reader.rewind()
    save_tensors_data(data, cache_path)
    return len(data.data)


def quantize_graph(src, dst, reader, method=DEFAULT_METHOD, excluded=(), per_channel=True,
                   op_types=DEFAULT_OP_TYPES, dedicated_pairs=False, cpu_dst=None) -> dict:
    """One FP32 graph -> its Q/DQ model at `dst` (TensorRT's form: symmetric int8), and with
    `cpu_dst` also ONNX Runtime's CPU form there (asymmetric uint8 activations, module docstring),
    same op types; op_types None quantizes every op type ONNX Runtime can. The recorded inputs
    run through the graph once: the ranges are saved as a calibration cache that the second form
    reads (they do not depend on the form). Returns {"nodes", "qdq": Counter, ..., "cpu_form":
    {"nodes", "qdq"}}."""
    cache = {"calibration_cache_path": dst + ".ranges.json"}
    entropy_tensors = 0
    if method == "entropy":  # its own KL search (quantize_static's has one bin count)
        entropy_tensors = entropy_cache(src, reader, None if op_types is None else list(op_types),
                                        cache["calibration_cache_path"])
    try:
        info = _quantize_form(src, dst, reader, method, excluded, per_channel, op_types, cache,
                              symmetric_int8=True, dedicated_pairs=dedicated_pairs)
        info["entropy_tensors"] = entropy_tensors
        if cpu_dst:
            cpu = _quantize_form(src, cpu_dst, None, method, excluded, per_channel, op_types, cache,
                                 symmetric_int8=False, dedicated_pairs=False)
            info["cpu_form"] = {"nodes": cpu["nodes"], "qdq": cpu["qdq"]}
    finally:
        for leftover in cache.values():
            if os.path.exists(leftover):
                os.unlink(leftover)
    return info


def _quantize_form(src, dst, reader, method, excluded, per_channel, op_types, cache, symmetric_int8,
                   dedicated_pairs) -> dict:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    extra = {"ActivationSymmetric": symmetric_int8, "WeightSymmetric": True, "QuantizeBias": False,
             "DedicatedQDQPair": bool(dedicated_pairs)}
    # No CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMaxCalibrater discards the collected
    # outputs without merging their ranges when it is set ("No data is collected"). Calibration
    # memory is bounded with shorter clips instead (evis calibrate --clip-length).
    if method == "percentile":
        extra["CalibPercentile"] = PERCENTILE
    tmp = dst + ".tmp"
    try:
        with _quiet_logging():
            quantize_static(src, tmp, reader, quant_format=QuantFormat.QDQ, **cache,
                            activation_type=QuantType.QInt8 if symmetric_int8 else QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            per_channel=per_channel, calibrate_method=_method(method),
                            nodes_to_exclude=list(excluded),
                            op_types_to_quantize=None if op_types is None else list(op_types),
                            extra_options=extra)
        model = onnx.load(tmp)
    finally:
        for leftover in (tmp, tmp + ".data", os.path.join(os.path.dirname(dst) or ".", "augmented_model.onnx")):
            if os.path.exists(leftover):
                os.unlink(leftover)
    outputs = float_graph_outputs(model)
    rewired = float_inputs_for(model, set(excluded))
    _prune_unused(model)
    # the CPU form is for ONNX Runtime only: its activations are uint8 with any zero point
    problems = check_qdq(model, set(excluded), tensorrt=symmetric_int8)
    if problems:
        raise RuntimeError(f"{os.path.basename(dst)}: " + "; ".join(problems[:5]))
    onnx.checker.check_model(model)
    onnx.save(model, dst)
    return {"nodes": len(model.graph.node), "rewired_inputs": rewired, "float_outputs": outputs,
            "qdq": dict(Counter(n.op_type for n in model.graph.node
                                if n.op_type in ("QuantizeLinear", "DequantizeLinear")))}


def _dq_source(graph, tensor):
    """The float tensor behind `tensor` if it is DequantizeLinear(QuantizeLinear(x)), else None."""
    dq = graph.producer.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = graph.producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    return q.input[0]


def float_inputs_for(model, excluded: set) -> int:
    """Excluded nodes read the float tensor, not its Q/DQ copy. Returns how many inputs moved."""
    graph = _Graph(model)
    moved = 0
    for node in model.graph.node:
        if _node_name(node) not in excluded:
            continue
        for i, name in enumerate(node.input):
            src = _dq_source(graph, name) if name else None
            if src is not None:
                node.input[i] = src
                moved += 1
    return moved


def float_graph_outputs(model) -> int:
    """Graph outputs are the float tensors themselves, not their Q/DQ copies, unless an INT8
    layer produces them (the backbone's FPN output convs: their output Q is what lets ONNX
    Runtime run them as QLinearConv and TensorRT fuse them; the stages then pool from int8-grid
    features). ONNX Runtime
    quantizes a graph output by renaming its producer's output to `<name>_QuantizeLinear_Input`
    and letting a DequantizeLinear produce `<name>`: the next graph (the stages reading p2..p5,
    the next clip reading next_queries) would get int8-rounded values, and the tensor names would
    no longer be the FP32 graph's (which the TensorRT calibration cache needs). Undo that: the
    producer writes `<name>` again, the Q reads it, the DQ writes `<name>_dequantized` for the
    graph's own consumers. Returns how many outputs changed."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    changed = 0
    for out in graph.output:
        dq = producer.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in producer:
            continue
        if producer[q.input[0]].op_type in WEIGHTED_OPS:
            continue  # an INT8 layer's own output (DQ-Conv-Q -> QLinearConv): kept
        inner, dq_out = q.input[0], out.name + "_dequantized"
        for node in graph.node:
            node.input[:] = [dq_out if i == out.name else i for i in node.input]
        dq.output[:] = [dq_out]
        for node in graph.node:
            node.output[:] = [out.name if o == inner else o for o in node.output]
            node.input[:] = [out.name if i == inner else i for i in node.input]
        for info in graph.value_info:
            if info.name == inner:
                info.name = out.name
        changed += 1
    return changed


def _prune_unused(model):
    """Remove Q/DQ nodes (and their constants) nobody reads any more."""
    graph = model.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def qdq_parameters(model) -> list:
    """[(node, scale ndarray, zero point ndarray or None)] of every Q/DQ node."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}

    def value(name):
        if not name:
            return None
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return "computed"

    out = []
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            out.append((n, value(n.input[1]), value(n.input[2]) if len(n.input) > 2 else None))
    return out


def check_qdq(model, excluded=frozenset(), tensorrt=True) -> list:
    """Problems of a Q/DQ model (empty: fine): scales constant, positive, finite; zero points
    constant, and for TensorRT 0 and INT8; no excluded node reading a dequantized value."""
    problems = []
    for node, scale, zp in qdq_parameters(model):
        where = f"{node.op_type} {_node_name(node)}"
        if isinstance(scale, str) or scale is None:
            problems.append(f"{where}: scale is not a constant")
        elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            problems.append(f"{where}: scale not positive and finite")
        if isinstance(zp, str):
            problems.append(f"{where}: zero point is not a constant")
        elif zp is not None and tensorrt:
            if zp.dtype != np.int8:
                problems.append(f"{where}: zero point of type {zp.dtype} (TensorRT: int8)")
            if np.any(zp != 0):
                problems.append(f"{where}: zero point {zp.ravel()[:4]} is not 0")
    graph = _Graph(model)
    for node in model.graph.node:
        if _node_name(node) in excluded:
            for name in node.input:
                p = graph.producer.get(name)
                if p is not None and p.op_type == "DequantizeLinear" and not graph.is_constant(p.input[0]):
                    problems.append(f"excluded {node.op_type} {_node_name(node)} reads dequantized {name}")
    return problems


def tensor_names(model) -> set:
    """Every tensor a graph's nodes read or write, and its inputs."""
    names = {v.name for v in model.graph.input}
    for node in model.graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def activation_scales(model) -> dict:
    """{float tensor name: scale} of every per-tensor activation QuantizeLinear (what a TensorRT
    calibration cache records)."""
    scales = {}
    for node, scale, _ in qdq_parameters(model):
        if node.op_type == "QuantizeLinear" and isinstance(scale, np.ndarray) and scale.size == 1:
            name = node.input[0]
            if name.endswith(RENAMED_OUTPUT):  # a graph output ONNX Runtime renamed
                name = name[:-len(RENAMED_OUTPUT)]
            scales[name] = float(scale.reshape(()))
    return scales
