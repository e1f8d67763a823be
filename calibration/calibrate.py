"""`evis calibrate`: MODEL_DIR + calibration clips -> QDQ_DIR (INT8 Q/DQ graphs + TensorRT caches).

    evis calibrate MODEL_DIR --out QDQ_DIR [--data DIR|VIDEO] [--method minmax|entropy|percentile]
                   [--clips N] [--clips-per-video K] [--quantize-stages | --quantize-all]
                   [--exclude OP|NODE ...]
                   [--threads N] [--cache-trt-version V] [--cache-algorithm A] [--evaluate SPLIT]

1. The FP32 graphs run in ONNX Runtime (CPU) through the runtime's clip loop on calibration clips
   (calibration/data.py: a YouTube-VIS folder, synthetic data/synth by default, or a video), clip
   after clip with the queries fed forward (every stage's mask head run), and every graph's inputs
   are recorded.
2. The backbone and the mask heads are quantized with ONNX Runtime's `quantize_static`
   (calibration/quantize.py: QDQ, INT8 symmetric, per-channel weights, default exclusions); the
   stages are written as they are (FP32, as ONNX Runtime's basic optimizer leaves them) unless
   --quantize-stages or --quantize-all. The backbone is quantized a second time in ONNX Runtime's
   CPU form (`backbone.cpu.onnx`: uint8 activations, no float Relus; 1.8x faster on the CPU
   provider), which `OrtBackend` runs on the CPU provider; TensorRT takes the symmetric int8 form.
3. Every Q/DQ graph in TensorRT's form must pass the TensorRT-readiness check
   (export/trt_check.py: zero points 0, ops TensorRT parses, ...), except for an export made with
   `--roi-align grouped`, which is for ONNX Runtime only (no check, no TensorRT caches, no
   TensorRT-form evaluation). The CPU form is checked for constant, positive, finite scales only.
4. QDQ_DIR gets the Q/DQ graphs (and the stages kept FP32) under the FP32 file names,
   `initial_queries.npy`, one TensorRT calibration cache per quantized graph
   (`<graph>.calibration.cache`, calibration/cache.py) and, written
   last, its own manifest.json: MODEL_DIR's, with the graphs pointing to the Q/DQ files and a
   `quantization` entry (method, exclusions, calibration clips, source graphs' sha256, caches).
   `OrtBackend(QDQ_DIR)`, `evis run --model QDQ_DIR`, `evis run --model MODEL_DIR --qdq QDQ_DIR`
   and `evis build MODEL_DIR --precision int8 --qdq QDQ_DIR` all read it.
5. With `--evaluate SPLIT`: AP of FP32 and INT8 on that split (calibration/evaluate.py; INT8 in
   both forms, the TensorRT form run by ONNX Runtime's CPU provider), recorded in the manifest
   (`quantization.evaluation`) -- the accuracy evidence that goes with INT8.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from datetime import datetime, timezone

from efficientvis import __version__
from efficientvis.calibration import cache as cache_lib
from efficientvis.calibration import data as data_lib
from efficientvis.calibration import quantize as Q
from efficientvis.errors import UserError
from efficientvis.runtime import manifest as manifest_lib

DEFAULT_DATA = os.path.join("data", "synth")
CACHE_SUFFIX = ".calibration.cache"
OWN_FILES = re.compile(r"^(backbone|stage_\d+|mask_\d+)(\.cpu)?\.onnx$|^(backbone|stage_\d+|mask_\d+)\.calibration\.cache$|"
                       r"^initial_queries\.npy$|^manifest\.json$")


def _clean(out_dir):
    for name in os.listdir(out_dir):
        if OWN_FILES.match(name):
            os.unlink(os.path.join(out_dir, name))


def _same_dir(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def calibrate(model_dir, out_dir, data=DEFAULT_DATA, method=Q.DEFAULT_METHOD, clips=data_lib.DEFAULT_CLIPS,
              clips_per_video=data_lib.DEFAULT_CLIPS_PER_VIDEO, quantize_all=False, quantize_stages=False, exclude=(),
              threads=0, cache_trt_version=None, cache_algorithm=cache_lib.DEFAULT_ALGORITHM,
              evaluate_split=None, eval_videos=0, log=print, clip_length=0) -> dict:
    """Write QDQ_DIR; returns its manifest dict."""
    if method not in Q.METHODS:
        raise UserError(f"--method must be one of {', '.join(Q.METHODS)}, got {method!r}")
    if clips < 1 or clips_per_video < 1:
        raise UserError(f"--clips and --clips-per-video must be >= 1, got {clips} and {clips_per_video}")
    if quantize_all and (exclude or quantize_stages):
        raise UserError("--quantize-all quantizes everything: it cannot be combined with "
                        + ("--exclude" if exclude else "--quantize-stages"))
    version = cache_trt_version or cache_lib.installed_tensorrt_version() or cache_lib.DEFAULT_TRT_VERSION
    cache_header = cache_lib.header(version, cache_algorithm)  # validates both before the long work
    manifest = manifest_lib.load(model_dir)
    source = data_lib.resolve_source(data)
    if evaluate_split:  # before the calibration, not after it
        from efficientvis.calibration.evaluate import check_split
        check_split(evaluate_split, "--evaluate")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and _same_dir(out_dir, model_dir):
        raise UserError("--out must be another folder than MODEL_DIR (the Q/DQ graphs keep the FP32 file names)")
    graphs = manifest.split_graphs
    missing = [g for g in graphs if g not in manifest.graphs]
    if missing:
        raise UserError(f"{model_dir}: the manifest lacks the split graphs {', '.join(missing)} "
                        f"(calibration quantizes backbone.onnx, stage_k.onnx and mask_k.onnx)")
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".evis-calibrate-", dir=out_dir)
    try:
        op_types = {g: Q.op_types_for(g, quantize_all, quantize_stages) for g in graphs}  # (): kept FP32
        return _calibrate(model_dir, out_dir, work, manifest, source, graphs, method, clips, clips_per_video,
                          quantize_all, op_types, exclude, threads, version, cache_algorithm, cache_header,
                          evaluate_split, eval_videos, log, clip_length)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _calibrate(model_dir, out_dir, work, manifest, source, graphs, method, clips, clips_per_video,
               quantize_all, op_types, exclude, threads, version, cache_algorithm, cache_header, evaluate_split,
               eval_videos, log, clip_length=0):
    import onnx

    from efficientvis.export import trt_check

    prepared, pre_info = {}, {}
    for g in graphs:  # ONNX Runtime's basic optimizations first (FrozenBN folded into the convs)
        prepared[g] = os.path.join(work, manifest.graphs[g]["file"])
        pre_info[g] = Q.preprocess(manifest.path(g), prepared[g])
    models = {g: onnx.load(prepared[g], load_external_data=False) for g in graphs}
    Q.check_extra_exclusions(list(models.values()), exclude)
    kept_fp32 = {g for g in graphs if op_types[g] == ()}
    for_onnxruntime_only = manifest.onnxruntime_only
    exclusions = {g: {} if g in kept_fp32 else Q.select_exclusions(models[g], extra=exclude, quantize_all=quantize_all)
                  for g in graphs}
    del models
    _clean(out_dir)  # the files of an earlier calibration (the manifest first of all)

    started = time.perf_counter()
    log(f"calibrating {model_dir} -> {out_dir}: method {method}, "
        f"{'everything quantized' if quantize_all else 'default exclusions' + (' + ' + ', '.join(exclude) if exclude else '')}"
        f"{', stages FP32' if kept_fp32 else ''}, "
        f"{clips} clips from {source.describe()}")
    recording = data_lib.record(model_dir, source, clips=clips, clips_per_video=clips_per_video,
                                clip_length=clip_length,
                                threads=threads, log=log, manifest=manifest)
    entries, details, caches = {}, {}, {}
    try:
        for g in graphs:
            t0 = time.perf_counter()
            src = prepared[g]
            file_name = manifest.graphs[g]["file"]
            dst = os.path.join(out_dir, file_name)
            inputs = [t["name"] for t in manifest.graphs[g].get("inputs", [])] or None
            cpu_file = g + manifest_lib.CPU_FORM_SUFFIX
            if g in kept_fp32:  # the preprocessed graph as it is
                onnx.save(onnx.load(src), dst)
                info = {"qdq": {}, "fp32": True}
            else:
                try:
                    info = Q.quantize_graph(src, dst, recording.reader(g, inputs), method=method,
                                            excluded=exclusions[g], op_types=op_types[g],
                                            dedicated_pairs=Q.dedicated_pairs_for(g),
                                            cpu_dst=os.path.join(out_dir, cpu_file) if Q.cpu_form_for(g) else None)
                except RuntimeError as e:
                    raise UserError(f"quantization of {g} failed: {e}") from e
            # a grouped RoIAlign export is for ONNX Runtime only (NonZero: data-dependent shapes)
            problems = [] if for_onnxruntime_only else trt_check.check_onnx(dst)
            if problems:
                raise UserError(f"{file_name}: the Q/DQ graph fails the TensorRT-readiness check: "
                                + "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
            model = onnx.load(dst)
            # TensorRT parses the FP32 ONNX and keys the cache by its tensor names: a scale of a
            # tensor that only exists in the preprocessed graph (folded away) would be ignored
            fp32_tensors = Q.tensor_names(onnx.load(manifest.path(g), load_external_data=False))
            scales = {k: v for k, v in Q.activation_scales(model).items() if k in fp32_tensors}
            if scales and not for_onnxruntime_only:  # a graph left FP32 has no INT8 tensor, so no cache
                cache_file = g + CACHE_SUFFIX
                cache_lib.write_cache(os.path.join(out_dir, cache_file), scales, version, cache_algorithm)
                caches[g] = {"file": cache_file, "header": cache_header, "tensors": len(scales)}
            entry = dict(manifest.graphs[g])
            entry.update(manifest_lib.file_entry(out_dir, file_name), external_data=[],
                         nodes=len(model.graph.node))
            entry.pop("export_seconds", None)
            if Q.dedicated_pairs_for(g):
                entry["onnxruntime_disabled_optimizers"] = list(Q.DEDICATED_PAIRS_DISABLED_OPTIMIZERS)
            if "cpu_form" in info:
                entry["cpu_form"] = dict(manifest_lib.file_entry(out_dir, cpu_file), nodes=info["cpu_form"]["nodes"])
            entries[g] = entry
            seconds = time.perf_counter() - t0
            details[g] = {"source_sha256": manifest.graphs[g].get("sha256"), "seconds": round(seconds, 2),
                          "preprocessed": pre_info[g], **info}
            qdq = info["qdq"]
            what = ("FP32 (--quantize-stages quantizes it)" if g in kept_fp32 else
                    f"{qdq.get('QuantizeLinear', 0):4d} Q / {qdq.get('DequantizeLinear', 0):4d} DQ, "
                    f"{len(exclusions[g])} nodes kept float, {len(scales)} cached scales"
                    f"{', + ' + cpu_file if 'cpu_form' in info else ''}")
            log(f"  {file_name:<14} {seconds:6.1f} s  {what}"
                f"{'' if for_onnxruntime_only else ', TensorRT check OK'}")
    finally:
        recording.cleanup()

    q_entry = manifest.data.get("initial_queries") or {"file": "initial_queries.npy"}
    shutil.copyfile(os.path.join(model_dir, q_entry["file"]), os.path.join(out_dir, q_entry["file"]))
    result = {k: v for k, v in manifest.data.items() if k not in ("verification", "graphs")}
    result.update(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), package_version=__version__,
        graphs=entries, initial_queries={**q_entry, **manifest_lib.file_entry(out_dir, q_entry["file"])})
    result["quantization"] = {
        "format": "QDQ", "tool": _ort_version(), "method": method,
        "activations": "int8 per-tensor symmetric (zero point 0)",
        "weights": "int8 per-channel symmetric (zero point 0)", "bias": "float",
        "cpu_form": {"suffix": manifest_lib.CPU_FORM_SUFFIX, "activations": "uint8 per-tensor asymmetric",
                     "weights": "int8 per-channel symmetric (zero point 0)", "bias": "float",
                     "graphs": [g for g in graphs if "cpu_form" in entries[g]],
                     "used_by": "ONNX Runtime's CPU provider"},
        "quantize_all": bool(quantize_all), "quantize_stages": not kept_fp32,
        "op_types": {g: "all" if op_types[g] is None else list(op_types[g]) for g in graphs},  # []: kept FP32
        "excluded_op_types": [] if quantize_all else list(Q.DEFAULT_EXCLUDED_OP_TYPES),
        "exclude_args": list(exclude),
        "excluded": {g: exclusions[g] for g in graphs},
        "calibration": {"source": source.path, "kind": source.kind, "clips_requested": clips,
                        "clips_per_video": clips_per_video, **recording.summary()},
        "source_model": {"dir": os.path.abspath(model_dir),
                         "graphs": {g: manifest.graphs[g].get("sha256") for g in graphs}},
        "graphs": details, "tensorrt_calibration_caches": caches,
        "tensorrt_check": "not applicable (--roi-align grouped)" if for_onnxruntime_only else "passed",
        "seconds": round(time.perf_counter() - started, 2)}
    if evaluate_split:
        from efficientvis.calibration.evaluate import evaluate

        fp32 = evaluate(model_dir, evaluate_split, threads=threads, max_videos=eval_videos, log=log)
        int8 = evaluate_qdq(model_dir, out_dir, result, evaluate_split, threads, eval_videos, log)
        evaluation = {"split": evaluate_split, "fp32": fp32, "int8": int8,
                      "delta_AP": round(int8["AP"] - fp32["AP"], 4)}
        line = f"AP FP32 {fp32['AP']:.4f}  INT8 {int8['AP']:.4f} (CPU form, delta {int8['AP'] - fp32['AP']:+.4f})"
        if not for_onnxruntime_only:  # what TensorRT will run, measured on ONNX Runtime's CPU provider
            trt_form = evaluate_qdq(model_dir, out_dir, result, evaluate_split, threads, eval_videos, log,
                                    tensorrt_form=True)
            evaluation.update(int8_tensorrt_form=trt_form,
                              delta_AP_tensorrt_form=round(trt_form["AP"] - fp32["AP"], 4))
            line += f"  {trt_form['AP']:.4f} (TensorRT form, delta {trt_form['AP'] - fp32['AP']:+.4f})"
        result["quantization"]["evaluation"] = evaluation
        log(line)
    manifest_lib.write(out_dir, result)
    log(f"wrote {out_dir}/manifest.json ({len(entries)} Q/DQ graphs, {result['quantization']['seconds']:.1f} s)")
    return result


def evaluate_qdq(model_dir, out_dir, data, split, threads, videos, log, tensorrt_form=False):
    """AP of the Q/DQ graphs before the manifest is final: a provisional manifest, then removed."""
    from efficientvis.calibration.evaluate import evaluate

    manifest_lib.write(out_dir, data)
    try:
        return evaluate(out_dir, split, threads=threads, max_videos=videos, log=log, tensorrt_form=tensorrt_form)
    finally:
        os.unlink(os.path.join(out_dir, manifest_lib.FILENAME))


def _ort_version():
    import onnxruntime

    return f"onnxruntime.quantization.quantize_static {onnxruntime.__version__}"


def add_arguments(p):
    p.add_argument("model", metavar="MODEL_DIR", help="folder written by evis export")
    p.add_argument("--out", required=True, metavar="QDQ_DIR", help="folder for the Q/DQ graphs")
    p.add_argument("--data", default=DEFAULT_DATA, metavar="DIR|VIDEO",
                   help="calibration clips: a YouTube-VIS folder (its train/ split if it has one) or a "
                        f"video (default {DEFAULT_DATA})")
    p.add_argument("--method", default=Q.DEFAULT_METHOD, choices=Q.METHODS,
                   help=f"calibration method (default {Q.DEFAULT_METHOD})")
    p.add_argument("--clips", type=int, default=data_lib.DEFAULT_CLIPS,
                   help=f"calibration clips (default {data_lib.DEFAULT_CLIPS})")
    p.add_argument("--clips-per-video", type=int, default=data_lib.DEFAULT_CLIPS_PER_VIDEO,
                   help=f"consecutive clips per video, from its first frame (default {data_lib.DEFAULT_CLIPS_PER_VIDEO})")
    p.add_argument("--clip-length", type=int, default=0, metavar="T",
                   help="frames per calibration clip (default: the model's T; e.g. 9 for a T = 36 "
                        "model at 360x640, whose calibration otherwise needs > 24 GB)")
    p.add_argument("--quantize-stages", action="store_true",
                   help="quantize the stages' weighted layers too (by default they stay FP32: "
                        "slower in INT8 on ONNX Runtime's CPU provider)")
    p.add_argument("--quantize-all", action="store_true",
                   help="quantize every op ONNX Runtime can, no exclusions (for comparison)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="OP|NODE",
                   help="more op types or node names to keep float (added to the defaults: "
                        f"{', '.join(Q.DEFAULT_EXCLUDED_OP_TYPES)}, attention MatMuls, output heads)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--cache-trt-version", default=None, metavar="X.Y.Z",
                   help="TensorRT version the calibration caches are for (default: the installed "
                        f"tensorrt, else {cache_lib.DEFAULT_TRT_VERSION})")
    p.add_argument("--cache-algorithm", default=cache_lib.DEFAULT_ALGORITHM, choices=cache_lib.ALGORITHMS,
                   help=f"calibrator algorithm named in the caches (default {cache_lib.DEFAULT_ALGORITHM})")
    p.add_argument("--evaluate", default=None, metavar="SPLIT",
                   help="also measure AP of FP32 and INT8 on this YouTube-VIS split (e.g. data/synth/valid)")
    p.add_argument("--eval-videos", type=int, default=0, help="only the first N videos of --evaluate")


def run(args) -> int:
    calibrate(args.model, args.out, data=args.data, method=args.method, clips=args.clips,
              clips_per_video=args.clips_per_video, quantize_all=args.quantize_all,
              quantize_stages=args.quantize_stages, exclude=args.exclude,
              threads=args.threads, cache_trt_version=args.cache_trt_version,
              cache_algorithm=args.cache_algorithm, evaluate_split=args.evaluate,
              eval_videos=args.eval_videos, log=lambda m: print(m, flush=True),
              clip_length=args.clip_length)
    return 0
