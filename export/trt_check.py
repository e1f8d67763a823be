"""`evis check MODEL_DIR`: will TensorRT's ONNX parser take these graphs? (no TensorRT needed)

Every graph the manifest lists (or one .onnx file) is read without its weights and compared with
`tensorrt_onnx_support.json`, a table (kept as data, with its sources) of what onnx-tensorrt parses
in TensorRT 10.x. A problem is anything that would make the parse fail or change the result:

- an op TensorRT does not parse (or a custom-domain op with no plugin), an op too new for 10.3;
- an opset outside what every 10.x parses (16..20: RoiAlign's half_pixel needs 16);
- RoiAlign below opset 16, without an explicit sampling_ratio (the parser would use 1, ONNX 0), with
  coordinate_transformation_mode other than half_pixel, mode other than avg/max, non-float input;
- data-dependent ops (NonZero, Unique, NonMaxSuppression, Compress) and If/Loop controlled by
  computed values;
- int64 (or float64) graph inputs; a uint8 graph input that feeds anything but a Cast;
- attribute, constant-input, rank and dtype restrictions of the table (e.g. Reduce* axes must be
  initializers, GridSample 4-D and 'bilinear', Q/DQ zero points 0, Resize modes).

`check_onnx(path)` and `check_model_dir(model_dir)` return the problems as strings (empty list:
ready) so calibration can reuse them; `inspect_onnx(path)` also returns op counts and notes.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from efficientvis.errors import UserError

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tensorrt_onnx_support.json")
MIN_OPSET = 16  # RoiAlign half_pixel
_TABLE = None

# onnx TensorProto enum -> the table's type names
_DTYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
           9: "BOOL", 10: "FP16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 16: "BF16",
           17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 21: "UINT4", 22: "INT4", 23: "FP4"}


def load_table(path: str = TABLE_PATH) -> dict:
    global _TABLE
    if path == TABLE_PATH and _TABLE is not None:
        return _TABLE
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    if path == TABLE_PATH:
        _TABLE = table
    return table


def _attr(node, name):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return None


def _version_tuple(text):
    import re

    m = re.match(r"(\d+)\.(\d+)", str(text))
    return (int(m.group(1)), int(m.group(2))) if m else None


class _Graph:
    """Lookups over one model: constants, producers, consumers, dtypes and ranks (shape inference)."""

    def __init__(self, model):
        import onnx

        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # noqa: BLE001 - the checks that need shapes are skipped
            inferred = model
        g = inferred.graph
        self.model = inferred
        self.initializers = {t.name: t for t in g.initializer}
        self.constants = dict(self.initializers)
        self.producer, self.consumers = {}, {}
        for node in g.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                self.constants[node.output[0]] = node
        self.types = {}
        for v in list(g.input) + list(g.output) + list(g.value_info):
            t = v.type.tensor_type
            if t.elem_type:
                dims = [d.dim_param or d.dim_value for d in t.shape.dim] if t.HasField("shape") else None
                self.types[v.name] = (_DTYPES.get(t.elem_type, str(t.elem_type)), dims)
        for t in g.initializer:
            self.types[t.name] = (_DTYPES.get(t.data_type, str(t.data_type)), list(t.dims))

    def dtype(self, name):
        return self.types.get(name, (None, None))[0]

    def rank(self, name):
        dims = self.types.get(name, (None, None))[1]
        return None if dims is None else len(dims)

    def is_constant(self, name):
        return name in self.constants

    def constant_value(self, name):
        from onnx import numpy_helper

        c = self.constants.get(name)
        if c is None:
            return None
        try:
            if hasattr(c, "op_type"):  # Constant node
                value = _attr(c, "value")
                return None if value is None else numpy_helper.to_array(value)
            if c.data_location == 1:  # external data not loaded
                return None
            return numpy_helper.to_array(c)
        except Exception:  # noqa: BLE001
            return None


def _type_tensors(node, spec, default):
    where = spec.get("type_tensor", default)
    out = []
    for item in where.split(","):
        kind, index = item.split(":")
        names = node.input if kind == "input" else node.output
        if int(index) < len(names) and names[int(index)]:
            out.append(names[int(index)])
    return out


def inspect_onnx(path: str, table: dict | None = None) -> dict:
    """{"file", "opset", "nodes", "ops" (Counter), "problems" [str], "notes" [str]} of one graph."""
    import onnx

    table = table or load_table()
    name = os.path.basename(path)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    problems, notes = [], []
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    opset = opsets.get("ai.onnx")
    lo, hi = max(MIN_OPSET, table["opset"]["min"]), table["opset"]["max"]
    if opset is None:
        problems.append(f"{name}: no default-domain opset import")
    elif not lo <= opset <= hi:
        problems.append(f"{name}: opset {opset} outside {lo}..{hi} (RoiAlign half_pixel needs >= 16; "
                        f"TensorRT 10.0-10.3 parse up to {hi})")
    if model.functions:
        notes.append(f"{name}: {len(model.functions)} local functions (inlined by the parser)")
    g = _Graph(model)
    ops = Counter()
    _check_inputs(model.graph, g, table, name, problems, notes)
    for node in model.graph.node:
        _check_node(node, g, table, opset, name, ops, problems, notes)
    for node in model.graph.node:  # nested graphs (If/Loop/Scan bodies)
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                for n in sub.node:
                    _check_node(n, g, table, opset, name, ops, problems, notes)
    return {"file": name, "path": path, "opset": opset, "nodes": sum(ops.values()), "ops": ops,
            "problems": problems, "notes": notes}


def _check_inputs(graph, g, table, name, problems, notes):
    forbidden = set(table["graph_inputs"]["forbidden"])
    cast_only = set(table["graph_inputs"]["cast_only"])
    initializer_names = set(g.initializers)
    for v in graph.input:
        if v.name in initializer_names:
            continue
        dtype = g.dtype(v.name)
        if dtype in forbidden:
            problems.append(f"{name}: graph input '{v.name}' is {dtype.lower()} "
                            f"({table['data_type_notes'].get(dtype, 'not a TensorRT input type')})")
        elif dtype in cast_only:
            bad = [n for n in g.consumers.get(v.name, []) if n.op_type != "Cast"]
            if bad:
                problems.append(f"{name}: {dtype.lower()} graph input '{v.name}' feeds "
                                f"{sorted({n.op_type for n in bad})}: TensorRT takes {dtype} only as "
                                f"network I/O, straight into a Cast")
            else:
                notes.append(f"{name}: {dtype.lower()} input '{v.name}' goes straight into a Cast (ok)")


def _check_node(node, g, table, opset, name, ops, problems, notes):
    op = node.op_type
    domain = node.domain or ""
    where = f"{name}: {op} node '{node.name or node.output[0]}'"
    if domain not in ("", "ai.onnx"):
        ops[f"{domain}::{op}"] += 1
        problems.append(f"{where}: custom op of domain '{domain}' (TensorRT needs a plugin named {op})")
        return
    ops[op] += 1
    spec = table["ops"].get(op)
    if op in table["data_dependent_ops"]:
        problems.append(f"{where}: data-dependent output shape")
        return
    if spec is None:
        why = "not supported" if op in table["unsupported"] else "not in the support table"
        problems.append(f"{where}: {why} by TensorRT's ONNX parser")
        return
    since = spec.get("since_trt")
    if since:
        v = _version_tuple(since)
        if v is None or v > (10, 3):
            problems.append(f"{where}: parsed only by TensorRT {since} (JetPack 6 has 10.3)")
    if spec.get("min_opset") and opset is not None and opset < spec["min_opset"]:
        problems.append(f"{where}: needs opset >= {spec['min_opset']} (model has {opset})")
    for index in table["control_flow_ops"].get(op, []):
        if index < len(node.input) and node.input[index] and not g.is_constant(node.input[index]):
            problems.append(f"{where}: controlled by a computed value (input {index}): data-dependent")
            break
    for attr_name, rule in spec.get("attributes", {}).items():
        value = _attr(node, attr_name)
        if value is None:
            if rule.get("required"):
                problems.append(f"{where}: attribute {attr_name} must be set explicitly")
            value = rule.get("default")
        if value is None:
            continue
        if "allowed" in rule and value not in rule["allowed"]:
            problems.append(f"{where}: {attr_name}={value!r} not supported (allowed: {rule['allowed']})")
        if rule.get("all_ones") and any(int(x) != 1 for x in value):
            problems.append(f"{where}: {attr_name}={list(value)} (TensorRT needs all ones)")
    for attr_name in spec.get("forbidden_attributes", []):
        if _attr(node, attr_name) is not None:
            problems.append(f"{where}: attribute {attr_name} not supported")
    for index in spec.get("constant_inputs", []):
        if index < len(node.input) and node.input[index] and not g.is_constant(node.input[index]):
            problems.append(f"{where}: input {index} must be a constant (initializer)")
    for index in spec.get("zero_inputs", []):
        if index < len(node.input) and node.input[index]:
            value = g.constant_value(node.input[index])
            if value is None and not g.is_constant(node.input[index]):
                problems.append(f"{where}: zero point (input {index}) must be a constant zero")
            elif value is not None and value.any():
                problems.append(f"{where}: zero point (input {index}) must be 0 (TensorRT: symmetric only)")
    if spec.get("max_outputs") and sum(1 for o in node.output if o) > spec["max_outputs"]:
        problems.append(f"{where}: only the first {spec['max_outputs']} output(s) supported")
    for index, ranks in spec.get("input_ranks", {}).items():
        index = int(index)
        rank = g.rank(node.input[index]) if index < len(node.input) else None
        if rank is not None and rank not in ranks:
            problems.append(f"{where}: input {index} has rank {rank} (TensorRT: {ranks})")
    for tensor in _type_tensors(node, spec, table.get("type_tensor_default", "input:0")):
        dtype = g.dtype(tensor)
        if dtype is not None and dtype not in spec["types"]:
            problems.append(f"{where}: {dtype} tensor '{tensor}' (TensorRT: {', '.join(spec['types'])})")
    if op == "Cast":
        to = _DTYPES.get(_attr(node, "to"))
        if to is not None and to not in spec["types"]:
            problems.append(f"{where}: cast to {to} (TensorRT: {', '.join(spec['types'])})")
    if op == "RoiAlign":
        if opset is not None and opset < 16:
            problems.append(f"{where}: RoiAlign at opset {opset} < 16: TensorRT uses output_half_pixel "
                            f"(not the aligned half_pixel the model needs)")
        rois = node.input[1] if len(node.input) > 1 else None
        dims = g.types.get(rois, (None, None))[1] if rois else None
        if dims is not None and (len(dims) != 2 or dims[1] not in (4, 0, "")):
            problems.append(f"{where}: rois must be (num_rois, 4), got {dims}")
    if op == "GridSample" and opset is not None and opset >= 20 and _attr(node, "mode") in (None, "linear", "cubic"):
        problems.append(f"{where}: GridSample-20 mode {(_attr(node, 'mode') or 'linear')!r}: onnx-tensorrt "
                        f"maps only 'bilinear'/'nearest'/'bicubic' (would run nearest); export at opset <= 19")
    if spec.get("plugin"):
        notes.append(f"{name}: {op} -> TensorRT plugin {spec['plugin']} (call trt.init_libnvinfer_plugins "
                     f"before parsing and before deserialising)")


def check_onnx(path: str, table: dict | None = None) -> list:
    """Problems (strings) of one ONNX file; empty list: TensorRT's parser should take it."""
    return inspect_onnx(path, table)["problems"]


def _graph_files(model_dir):
    """(graph name, path) of every graph of MODEL_DIR's manifest (sha256-checked)."""
    from efficientvis.runtime import manifest as manifest_lib

    m = manifest_lib.load(model_dir)
    return [(name, m.path(name)) for name in m.graph_names]


def inspect_model_dir(model_dir: str, table: dict | None = None) -> list:
    table = table or load_table()
    return [inspect_onnx(path, table) for _, path in _graph_files(model_dir)]


def check_model_dir(model_dir: str, table: dict | None = None) -> list:
    """Problems (strings, each naming its file) of every graph of MODEL_DIR; empty list: ready."""
    return [p for report in inspect_model_dir(model_dir, table) for p in report["problems"]]


def format_report(reports: list) -> str:
    """Per-graph summary + op-count table (one column per graph)."""
    lines = [f"{'graph':<18} {'opset':>5} {'nodes':>6} {'problems':>8}"]
    for r in reports:
        lines.append(f"{r['file']:<18} {r['opset'] or '-':>5} {r['nodes']:>6} {len(r['problems']):>8}")
    all_ops = sorted(set().union(*(r["ops"] for r in reports))) if reports else []
    cols = [r["file"].rsplit(".onnx", 1)[0] for r in reports]
    width = max([len(c) for c in cols] + [5])
    lines.append("")
    lines.append(f"{'op':<22}" + "".join(f" {c:>{width}}" for c in cols))
    for op in all_ops:
        lines.append(f"{op:<22}" + "".join(f" {r['ops'].get(op, 0) or '.':>{width}}" for r in reports))
    return "\n".join(lines)


def add_arguments(p):
    p.add_argument("model", metavar="MODEL_DIR", help="folder written by evis export (or one .onnx file)")
    p.add_argument("--quiet", action="store_true", help="only problems and the summary line")


def run(args) -> int:
    table = load_table()
    if os.path.isfile(args.model) and args.model.endswith(".onnx"):
        reports = [inspect_onnx(args.model, table)]
    else:
        reports = inspect_model_dir(args.model, table)
    problems = [p for r in reports for p in r["problems"]]
    if not args.quiet:
        print(format_report(reports))
        notes = sorted({n for r in reports for n in r["notes"]})
        if notes:
            print()
            for n in notes:
                print(f"note: {n}")
        print()
    for p in problems:
        print(f"problem: {p}")
    target = f"TensorRT {table['tensorrt'].split(' ')[0]} ONNX parser"
    if problems:
        print(f"evis check: {len(problems)} problem(s) in {sum(1 for r in reports if r['problems'])} of "
              f"{len(reports)} graph(s) for the {target}")
        return 1
    print(f"evis check: {len(reports)} graph(s) OK for the {target} (opsets "
          f"{', '.join(sorted({str(r['opset']) for r in reports}))})")
    return 0
