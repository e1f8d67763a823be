"""`evis build`: TensorRT engines from an exported model (one engine per split graph).

    evis build MODEL_DIR --out ENGINE_DIR --precision fp32|fp16|int8 [--qdq QDQ_DIR]
               [--workspace MB] [--timing-cache PATH] [--min TxHxW] [--opt TxHxW] [--max TxHxW]
               [--typing auto|weak|strong] [--skip-if-unavailable] [--verbose]

Every decision (typing, builder flags, which ONNX, profile shapes, metadata) is made by the pure
functions of export/engine_plan.py; this module only calls TensorRT, exactly the documented way:
`init_libnvinfer_plugins(logger, "")` (ROIAlign_TRT) -> Builder -> create_network(flags) ->
OnnxParser.parse_from_file -> create_builder_config -> set_memory_pool_limit(WORKSPACE) ->
[builder flags, FP32 layer precisions] -> [timing cache] -> one optimization profile with
set_shape(min, opt, max) per dynamic input -> build_serialized_network -> the plan file.

ENGINE_DIR (what runtime/trt_backend.py loads): `<graph>.engine` + `<graph>.engine.json`
(tensorrt_version, gpu_name, compute_capability, precision, profiles, onnx_sha256, ...) for
backbone, stage_0 .. stage_{M-1}, mask_0 .. mask_{M-1}, plus copies of MODEL_DIR's manifest.json and
initial_queries.npy. FP16 on strongly typed networks (TensorRT >= 10.12 by default, always on 11)
builds from FP16 ONNX graphs converted here (onnxconverter-common, kept in ENGINE_DIR/onnx_fp16/).
Engines are tied to the TensorRT version and the GPU: build them on the device that runs them
(a Jetson's on the Jetson).

Without TensorRT (or without a GPU) nothing is built: a UserError says why, or, with
--skip-if-unavailable (what `make export` uses), one line says engines were not built and why,
and the command succeeds.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from efficientvis.errors import UserError
from efficientvis.export import engine_plan as P
from efficientvis.runtime import manifest as manifest_lib
from efficientvis.runtime.trt_backend import ENGINE_SUFFIX, METADATA_SUFFIX
from efficientvis.ytvis.results import write_json_atomic


def import_tensorrt():
    """(tensorrt module, None) or (None, why it cannot be used)."""
    try:
        import tensorrt as trt
    except ImportError:
        return None, ("the tensorrt Python package is not installed (JetPack ships it; on x86 install "
                      "TensorRT 10/11 from NVIDIA)")
    except Exception as e:  # noqa: BLE001 - e.g. libnvinfer not found
        return None, f"the tensorrt Python package does not load ({type(e).__name__}: {str(e)[:160]})"
    return trt, None


def have_fp16_converter() -> bool:
    try:
        from onnxconverter_common import float16  # noqa: F401
    except ImportError:
        return False
    return True


def convert_fp16(src, dst, block_ops=P.FP16_BLOCK_OPS) -> str:
    """FP32 ONNX -> FP16 ONNX (float I/O kept float32, `block_ops` kept FP32) with
    onnxconverter-common's float16 converter."""
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError:
        raise UserError("an FP16 ONNX needs onnxconverter-common (pip install onnxconverter-common)") from None
    model = onnx.shape_inference.infer_shapes(onnx.load(src))  # value_info for every tensor
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(block_ops))
    converted = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    _fix_float_casts(converted)
    _float_outputs(converted, {o.name for o in model.graph.output
                               if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT})
    onnx.checker.check_model(converted)
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    onnx.save(converted, dst)
    return dst


def _fix_float_casts(model) -> int:
    """onnxconverter-common 1.16 retypes a Cast's output to FLOAT16 (value_info) but leaves the
    node's `to` = FLOAT (e.g. the backbone's uint8 -> float Cast): make `to` agree. (Putting Cast
    in its op_block_list instead makes the converter loop forever.)"""
    from onnx import TensorProto, helper

    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    fixed = 0
    for node in model.graph.node:
        if node.op_type != "Cast" or types.get(node.output[0]) != TensorProto.FLOAT16:
            continue
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT:
                node.attribute.remove(attr)
                node.attribute.extend([helper.make_attribute("to", TensorProto.FLOAT16)])
                fixed += 1
                break
    return fixed


def _float_outputs(model, names) -> int:
    """Graph outputs that were float32 stay float32 (keep_io_types misses an output whose
    producer is a blocked node: it gets the FP16 Cast the converter puts after blocked nodes)."""
    from onnx import TensorProto, helper

    fixed = 0
    for out in model.graph.output:
        if out.name not in names or out.type.tensor_type.elem_type == TensorProto.FLOAT:
            continue
        inner = out.name + "_fp16"
        for node in model.graph.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
            node.input[:] = [inner if i == out.name else i for i in node.input]
        for info in model.graph.value_info:
            if info.name == out.name:
                info.name = inner
        model.graph.node.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT,
                                                 name=out.name + "_to_float32"))
        out.type.tensor_type.elem_type = TensorProto.FLOAT
        fixed += 1
    return fixed


def gpu_info():
    """(name, "major.minor") of the current CUDA device via cuda-python (as the runtime does)."""
    from efficientvis.runtime.trt_backend import _Cuda, _import_cudart

    return _Cuda(_import_cudart()).device_info()


# ----------------------------------------------------------------------------------------------
# the TensorRT calls (thin: everything they use comes from engine_plan)

def build_engine(trt, logger, onnx_path, plan, profile, workspace_mb, timing_cache=None, fp32_nodes=()):
    """One serialised engine (bytes) from one ONNX file; returns (plan bytes, timing cache bytes)."""
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"{onnx_path}: TensorRT's ONNX parser failed: " + "; ".join(errors[:3]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if fp32_nodes:
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.name in fp32_nodes:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, False)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"{onnx_path}: TensorRT could not build the engine (see its log above; on a "
                        f"small device try a smaller --workspace or --max profile)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


# ----------------------------------------------------------------------------------------------

def _nodes_of_types(onnx_path, op_types):
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    return {n.name for n in model.graph.node if n.op_type in op_types and n.name}


def build_engines(model_dir, out_dir, precision="fp16", qdq_dir=None, workspace_mb=P.DEFAULT_WORKSPACE_MB,
                  timing_cache=None, min_shape=None, opt_shape=None, max_shape=None, typing="auto",
                  verbose=False, log=print, trt=None) -> dict:
    """Build ENGINE_DIR; returns {graph: metadata}."""
    manifest = manifest_lib.load(model_dir)
    if manifest.onnxruntime_only:
        raise UserError(f"{model_dir}: exported with --roi-align grouped (data-dependent shapes, ONNX "
                        f"Runtime only); export again with --roi-align roialign or gridsample for TensorRT")
    qdq = None
    if qdq_dir:
        qdq = manifest_lib.load(qdq_dir)
        P.check_qdq_matches(manifest, qdq)
    graphs = P.graphs_to_build(manifest)
    shapes = P.clip_profile(manifest.dynamic_axes, min_shape, opt_shape, max_shape)
    if workspace_mb < 16:
        raise UserError(f"--workspace must be >= 16 MB, got {workspace_mb}")
    if trt is None:
        trt, why = import_tensorrt()
        if trt is None:
            raise UserError(f"engines not built: {why}")
    plan = P.plan_build(trt.__version__, precision, typing, has_qdq=qdq is not None,
                        fp16_converter=have_fp16_converter())
    try:
        gpu_name, capability = gpu_info()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - no CUDA device / driver
        raise UserError(f"engines not built: no usable CUDA GPU ({type(e).__name__}: {str(e)[:160]})") from None
    os.makedirs(out_dir, exist_ok=True)
    log(f"TensorRT {trt.__version__} on {gpu_name} (compute {capability}): {precision} engines, "
        f"{'strongly' if plan.strongly_typed else 'weakly'} typed, flags {plan.builder_flags or 'none'}, "
        f"ONNX {plan.onnx_variant}, profile T x H x W min {shapes['min']} opt {shapes['opt']} max {shapes['max']}")
    for note in plan.notes:
        log(f"note: {note}")
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # ROIAlign_TRT: before parsing
    cache_bytes = None
    if timing_cache and os.path.isfile(timing_cache):
        with open(timing_cache, "rb") as f:
            cache_bytes = f.read()
    metas = {}
    for g in graphs:
        t0 = time.perf_counter()
        if plan.onnx_variant == "qdq":
            onnx_path = qdq.path(g)
        elif plan.onnx_variant == "fp16":
            onnx_path = convert_fp16(manifest.path(g), os.path.join(out_dir, "onnx_fp16", manifest.graphs[g]["file"]))
        else:
            onnx_path = manifest.path(g)
        profile = P.profile_shapes(manifest.graphs[g], shapes)
        fp32_nodes = _nodes_of_types(onnx_path, plan.fp32_op_types) if plan.fp32_op_types else set()
        engine, cache_bytes = build_engine(trt, logger, onnx_path, plan, profile, workspace_mb,
                                           cache_bytes, fp32_nodes)
        engine_path = os.path.join(out_dir, g + ENGINE_SUFFIX)
        with open(engine_path, "wb") as f:
            f.write(engine)
        meta = P.engine_metadata(plan, g, trt.__version__, gpu_name, capability, profile,
                                 manifest_lib.sha256_of(onnx_path), os.path.relpath(onnx_path, out_dir),
                                 workspace_mb, time.perf_counter() - t0,
                                 extra={"notes": plan.notes} if plan.notes else None)
        write_json_atomic(os.path.join(out_dir, g + METADATA_SUFFIX), meta, indent=2)
        metas[g] = meta
        log(f"  {g + ENGINE_SUFFIX:<16} {meta['build_seconds']:7.1f} s  {len(engine) / 2**20:7.1f} MB")
    if timing_cache and cache_bytes:
        with open(timing_cache, "wb") as f:
            f.write(cache_bytes)
    copy_model_files(manifest, out_dir)
    log(f"wrote {len(metas)} engines to {out_dir}")
    return metas


def copy_model_files(manifest, out_dir):
    """manifest.json and initial_queries.npy next to the engines (the runtime reads them there)."""
    q = (manifest.data.get("initial_queries") or {}).get("file", "initial_queries.npy")
    shutil.copyfile(os.path.join(manifest.model_dir, q), os.path.join(out_dir, q))
    shutil.copyfile(os.path.join(manifest.model_dir, manifest_lib.FILENAME),
                    os.path.join(out_dir, manifest_lib.FILENAME))


def add_arguments(p):
    p.add_argument("model", metavar="MODEL_DIR", help="folder written by evis export")
    p.add_argument("--out", required=True, metavar="ENGINE_DIR", help="folder for the engines")
    p.add_argument("--precision", default="fp16", choices=P.PRECISIONS, help="default fp16")
    p.add_argument("--qdq", metavar="QDQ_DIR", help="Q/DQ graphs from evis calibrate (needed for int8)")
    p.add_argument("--workspace", type=int, default=P.DEFAULT_WORKSPACE_MB, metavar="MB",
                   help=f"builder workspace limit (default {P.DEFAULT_WORKSPACE_MB} MB; less on Orin Nano)")
    p.add_argument("--timing-cache", metavar="PATH", help="TensorRT timing cache to read and update")
    for key in ("min", "opt", "max"):
        p.add_argument(f"--{key}", metavar="TxHxW", default=None,
                       help=f"{key} clip shape of the optimisation profile (default: the manifest's)")
    p.add_argument("--typing", default="auto", choices=P.TYPINGS,
                   help="network typing on TensorRT 10.x (auto: weak before 10.12, strong from 10.12)")
    p.add_argument("--skip-if-unavailable", action="store_true",
                   help="without TensorRT or a GPU: say that no engine was built and why, exit 0")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")


def run(args) -> int:
    if args.skip_if_unavailable:
        trt, why = import_tensorrt()
        if trt is None:
            print(f"evis build: engines NOT built: {why}. The ONNX graphs ({args.model}) and the Q/DQ graphs "
                  f"are ready; run `evis build` on the target (Jetson / GPU machine with TensorRT).",
                  file=sys.stderr)
            return 0
        try:
            gpu_info()
        except Exception as e:  # noqa: BLE001
            print(f"evis build: engines NOT built: TensorRT {trt.__version__} is installed but no CUDA GPU "
                  f"is usable ({str(e)[:160]}).", file=sys.stderr)
            return 0
    build_engines(args.model, args.out, precision=args.precision, qdq_dir=args.qdq,
                  workspace_mb=args.workspace, timing_cache=args.timing_cache, min_shape=args.min,
                  opt_shape=args.opt, max_shape=args.max, typing=args.typing, verbose=args.verbose,
                  log=lambda m: print(m, flush=True))
    return 0
