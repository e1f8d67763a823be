"""Every decision of `evis build`, as pure functions (no TensorRT needed: tested everywhere).

export/engine.py makes the TensorRT calls; what it calls them with comes from here:

- `parse_version`, `plan_build`: which network typing, builder flags and ONNX variant a TensorRT
  version and a precision need (table below), or a UserError;
- `profile_shapes`: the optimisation profile (min/opt/max) of every dynamic input, from the
  manifest's dynamic axes or the user's --min/--opt/--max clip shapes;
- `engine_metadata`: the `<graph>.engine.json` that runtime/trt_backend.py checks.

| TensorRT      | fp32              | fp16                                  | int8 (Q/DQ ONNX from evis calibrate)      |
|---------------|-------------------|---------------------------------------|-------------------------------------------|
| < 8.6         | refused           | refused                               | refused                                   |
| 8.6 .. 10.11  | weak, no flag     | weak + FP16 flag on the FP32 ONNX     | weak + INT8 + FP16 flags on the Q/DQ ONNX |
| 10.12 .. 10.x | strong            | strong, FP16 ONNX (weak + FP16 flag   | strong, Q/DQ ONNX                         |
|               |                   | if onnxconverter-common is missing)   |                                           |
| >= 11         | strong            | strong, FP16 ONNX (converter needed)  | strong, Q/DQ ONNX                         |

Sources: weak typing (BuilderFlag.FP16/INT8) was deprecated in TensorRT 10.12 and removed in 11
("TensorRT 11.x removes all weak typing APIs", Migrating from TensorRT 10.x to 11.x); on 11 FP16
comes from an ONNX whose tensors are FP16 and INT8 from Q/DQ nodes (removed-API table: kFP16 ->
"strong typing with ModelOpt AutoCast", kINT8 -> "explicit quantization with Q/DQ nodes");
"Use explicit quantization with Strong Typing. Precision-control build flags are not required"
(TensorRT Explicit Quantization guide); the STRONGLY_TYPED creation flag exists from 10.0 and is
accepted but ignored on 11. Weakly typed Q/DQ + INT8 + FP16 flags is trtexec's `--int8 --fp16`
on a Q/DQ model: the layers around the Q/DQ pairs may then run FP16 (strongly typed, they run in
the ONNX's FP32). --typing weak|strong overrides the default on 10.x.

RoiAlign under reduced precision: one TensorRT 10.3 report of "Could not find any implementation
for node RoiAlign" under FP16, so with weak typing and FP16 allowed the RoiAlign (and GridSample)
layers are asked to run FP32 (layer precision + PREFER_PRECISION_CONSTRAINTS), and the FP16 ONNX
keeps them FP32 (converter op_block_list).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from efficientvis.errors import UserError

PRECISIONS = ("fp32", "fp16", "int8")
TYPINGS = ("auto", "weak", "strong")
MIN_VERSION = (8, 6)
WEAK_DEPRECATED = (10, 12)
STRONG_FLAG_SINCE = (10, 0)
DEFAULT_WORKSPACE_MB = 1024  # Orin Nano (8 GB shared): keep the builder's scratch memory modest
FP32_OP_TYPES = ("RoiAlign", "GridSample")  # kept FP32 when FP16 is allowed
# FP16 ONNX (TensorRT >= 10.12 / 11): ops kept FP32 by onnxconverter-common's op_block_list, on top
# of its defaults: RoiAlign (plugin, see above), GridSample, and the statistics/exponent ops whose
# FP16 range or rounding hurts (LayerNormalization's variance, Softmax's exp, box exp/log, L2 norms).
FP16_BLOCK_OPS = ("RoiAlign", "GridSample", "ConstantOfShape", "LayerNormalization", "Softmax", "ReduceMean", "ReduceL2",
                  "ReduceSum", "Exp", "Log", "Sqrt", "Pow")


def parse_version(text) -> tuple:
    """'10.3.0.26' -> (10, 3, 0); UserError for anything else."""
    m = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not m:
        raise UserError(f"cannot read the TensorRT version {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


@dataclass
class BuildPlan:
    tensorrt_version: str
    precision: str
    strongly_typed: bool
    network_flags: list = field(default_factory=list)  # NetworkDefinitionCreationFlag names
    builder_flags: list = field(default_factory=list)  # BuilderFlag names
    onnx_variant: str = "fp32"  # "fp32" (MODEL_DIR), "fp16" (converted), "qdq" (QDQ_DIR)
    fp32_op_types: list = field(default_factory=list)  # layers asked to run FP32 (weak typing)
    notes: list = field(default_factory=list)

    def to_dict(self):
        return asdict(self)


def plan_build(version, precision, typing="auto", has_qdq=False, fp16_converter=True) -> BuildPlan:
    """How to build `precision` engines with TensorRT `version` (see the module's table)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if typing not in TYPINGS:
        raise UserError(f"--typing must be one of {', '.join(TYPINGS)}, got {typing!r}")
    v = parse_version(version)
    text = ".".join(map(str, v))
    if v[:2] < MIN_VERSION:
        raise UserError(f"TensorRT {text} is too old: evis build needs TensorRT >= 8.6 (ONNX RoiAlign "
                        f"with half_pixel, explicit quantization, the tensor-name API); JetPack 6 has 10.3")
    if precision == "int8" and not has_qdq:
        raise UserError("--precision int8 needs the Q/DQ graphs: run `evis calibrate MODEL_DIR --out QDQ_DIR` "
                        "and pass --qdq QDQ_DIR (TensorRT's implicit INT8 calibration is deprecated since "
                        "10.1 and gone in 11)")
    notes = []
    if v[0] >= 12:
        notes.append(f"TensorRT {text} is newer than this builder was written for (11.x); treated as 11.x")
    weak_possible = v[0] < 11
    strong_possible = v[:2] >= STRONG_FLAG_SINCE
    if typing == "weak" and not weak_possible:
        raise UserError(f"--typing weak: TensorRT {text} has no weakly typed networks (removed in 11); "
                        f"use --typing auto")
    if typing == "strong" and not strong_possible:
        raise UserError(f"--typing strong: TensorRT {text} has no strongly typed networks (since 10.0)")
    if typing == "auto":
        strong = v[:2] >= WEAK_DEPRECATED
        if strong and precision == "fp16" and not fp16_converter:
            if weak_possible:
                strong = False
                notes.append("onnxconverter-common is not installed: FP16 by the (deprecated) FP16 builder "
                             "flag instead of an FP16 ONNX (pip install onnxconverter-common)")
    else:
        strong = typing == "strong"
    if strong and precision == "fp16" and not fp16_converter:
        raise UserError(f"FP16 on a strongly typed network (TensorRT {text}) needs an FP16 ONNX, made with "
                        f"onnxconverter-common: pip install onnxconverter-common")

    plan = BuildPlan(tensorrt_version=text, precision=precision, strongly_typed=strong, notes=notes)
    if v[0] < 10:
        plan.network_flags.append("EXPLICIT_BATCH")  # required for ONNX before 10 (ignored since)
    if strong and v[0] < 11:
        plan.network_flags.append("STRONGLY_TYPED")  # 11: always strongly typed (flag ignored)
    if precision == "fp16":
        if strong:
            plan.onnx_variant = "fp16"
        else:
            plan.builder_flags.append("FP16")
    elif precision == "int8":
        plan.onnx_variant = "qdq"
        if not strong:
            plan.builder_flags += ["INT8", "FP16"]  # trtexec --int8 --fp16 on a Q/DQ model
        else:
            plan.notes.append("strongly typed INT8: layers outside the Q/DQ pairs run in the ONNX's FP32")
    if not strong and "FP16" in plan.builder_flags:
        plan.fp32_op_types = list(FP32_OP_TYPES)
        plan.builder_flags.append("PREFER_PRECISION_CONSTRAINTS")
    if not strong and v[:2] >= WEAK_DEPRECATED:
        plan.notes.append(f"weak typing is deprecated in TensorRT {text} (removed in 11)")
    return plan


# ----------------------------------------------------------------------------------------------
# optimisation profiles

def parse_shape(text) -> tuple:
    """'TxHxW' (e.g. 6x192x320) -> (T, H, W)."""
    try:
        parts = tuple(int(p) for p in str(text).lower().replace(",", "x").split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise UserError(f"clip shape must be TxHxW with positive integers (e.g. 6x192x320), got {text!r}")
    return parts


def clip_profile(axes: dict, min_shape=None, opt_shape=None, max_shape=None) -> dict:
    """{"min"|"opt"|"max": (T, H, W)} from the manifest's dynamic_axes, each overridable; checked
    min <= opt <= max and inside what the graphs were exported for."""
    try:
        base = {k: (int(axes["T"][k]), int(axes["H"][k]), int(axes["W"][k])) for k in ("min", "opt", "max")}
    except (KeyError, TypeError, ValueError):
        raise UserError("manifest.json has no dynamic_axes T/H/W min/opt/max (export again)") from None
    given = {"min": min_shape, "opt": opt_shape, "max": max_shape}
    shapes = {k: (parse_shape(v) if isinstance(v, str) else tuple(v)) if v is not None else base[k]
              for k, v in given.items()}
    for i, axis in enumerate("THW"):
        lo, hi = base["min"][i], base["max"][i]
        a, b, c = shapes["min"][i], shapes["opt"][i], shapes["max"][i]
        if not a <= b <= c:
            raise UserError(f"profile {axis}: min {a} <= opt {b} <= max {c} does not hold")
        if a < lo or c > hi:
            raise UserError(f"profile {axis} {a}..{c} is outside what the graphs were exported for "
                            f"({lo}..{hi}); export again with other --max-clip/--min-size/--max-size")
    return shapes


def _axis_values(T, H, W):
    values = {"T": T, "H": H, "W": W}
    for s in (4, 8, 16, 32):
        values[f"H{s}"], values[f"W{s}"] = -(-H // s), -(-W // s)
    return values


def profile_shapes(graph_entry: dict, clip_shapes: dict) -> dict:
    """{input name: (min shape, opt shape, max shape)} of a graph's dynamic inputs (inputs whose
    manifest shape names an axis), for IOptimizationProfile.set_shape."""
    out = {}
    values = {k: _axis_values(*clip_shapes[k]) for k in ("min", "opt", "max")}
    for tensor in graph_entry.get("inputs", []):
        shape = tensor["shape"]
        if all(isinstance(d, int) for d in shape):
            continue
        try:
            out[tensor["name"]] = tuple(tuple(values[k][d] if isinstance(d, str) else int(d) for d in shape)
                                        for k in ("min", "opt", "max"))
        except KeyError as e:
            raise UserError(f"manifest: input {tensor['name']} has an unknown axis {e}") from None
    return out


# ----------------------------------------------------------------------------------------------

def graphs_to_build(manifest) -> list:
    """The split graphs the TensorRT backend runs: backbone, stage_0 .. stage_{M-1}, mask_0 .. mask_{M-1}."""
    names = manifest.split_graphs
    missing = [n for n in names if n not in manifest.graphs]
    if missing:
        raise UserError(f"{manifest.model_dir}: the manifest lacks {', '.join(missing)} "
                        f"(engines are built from the split graphs)")
    return names


def check_qdq_matches(model_manifest, qdq_manifest) -> None:
    """The Q/DQ graphs must come from these FP32 graphs (sha256 recorded by evis calibrate)."""
    q = (qdq_manifest.data.get("quantization") or {}).get("source_model") or {}
    sources = q.get("graphs") or {}
    if not sources:
        raise UserError(f"{qdq_manifest.model_dir}: no quantization.source_model in its manifest "
                        f"(not written by evis calibrate?)")
    for g, sha in sources.items():
        want = model_manifest.graphs.get(g, {}).get("sha256")
        if want and sha != want:
            raise UserError(f"{qdq_manifest.model_dir}: its {g} was calibrated from another export "
                            f"than {model_manifest.model_dir} (sha256 differs); calibrate again")


def engine_metadata(plan: BuildPlan, graph: str, tensorrt_version: str, gpu_name: str,
                    compute_capability, profiles: dict, onnx_sha256: str, onnx_file: str,
                    workspace_mb: int, build_seconds: float = None, extra: dict = None) -> dict:
    """`<graph>.engine.json`: the keys runtime/trt_backend.py checks (tensorrt_version, gpu_name,
    compute_capability) and reads (precision, profiles), plus how the engine was built."""
    meta = {
        "tensorrt_version": str(tensorrt_version),
        "gpu_name": str(gpu_name),
        "compute_capability": (".".join(str(int(c)) for c in compute_capability)
                               if isinstance(compute_capability, (tuple, list)) else str(compute_capability)),
        "precision": plan.precision,
        "profiles": [{name: [list(s) for s in shapes] for name, shapes in profiles.items()}],
        "onnx_sha256": onnx_sha256,
        "graph": graph,
        "onnx_file": onnx_file,
        "onnx_variant": plan.onnx_variant,
        "strongly_typed": plan.strongly_typed,
        "network_flags": list(plan.network_flags),
        "builder_flags": list(plan.builder_flags),
        "fp32_op_types": list(plan.fp32_op_types),
        "workspace_mb": int(workspace_mb),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if build_seconds is not None:
        meta["build_seconds"] = round(float(build_seconds), 2)
    if extra:
        meta.update(extra)
    return meta
