"""`evis parity`: PyTorch against every other backend and precision on this machine, per output
tensor and end to end, with tolerances per precision; exit code 1 when one is broken (for CI).

    evis parity --checkpoint CKPT --model MODEL_DIR --data DIR [--qdq QDQ_DIR] [--engines ENGINE_DIR]
                [--videos N] [--clips N] [--json out.json] [--tol-KEY VALUE] [--tol PREC.KEY=VALUE]
    evis parity --results GOT.json --reference REF.json --ann ANN [--precision fp32|fp16|int8]

The second form compares two finished results files end to end (step 2 below; a track of a results
file = its entries with identical masks), e.g. `evis run --dataset` against `evis infer`.

Backends (each one only where it exists here; the others are listed as skipped with the reason):
ONNX Runtime FP32 on the CPU (always), on CUDA (CUDAExecutionProvider present), ONNX Runtime INT8
with the Q/DQ graphs of `--qdq` (written by `evis calibrate`), the TensorRT execution provider
(FP16, and INT8 with `--qdq`) and TensorRT engines of `--engines` (`evis build`; precision from
their metadata) where `import tensorrt` works. The reference is the checkpoint in PyTorch (FP32).

1. Per tensor, identical inputs (the first `--clips` clips of the data): every graph of an ONNX
   backend gets the inputs PyTorch's own graph wrappers get (frames; features, queries and proposals
   computed by PyTorch; clip c > 0 starts from PyTorch's `next_queries` of clip c - 1) and each of
   its outputs is compared with PyTorch's (`per_graph`); and the first clip through the backend's
   own clip interface (all stages chained inside the backend, q* in) is compared on the clip
   outputs class_logits, proposals, mask_probs (`per_clip`; the only per-tensor view of a
   TensorRT engine). Statistics: max and mean absolute error, max relative error
   (|a - b| / max(|b|, 1e-3 max|b|)), cosine similarity, max|reference|.
   A tensor passes when max_abs <= KIND_abs + KIND_rel * max|reference| and cosine >= `cosine`,
   KIND = logits (class_logits), probs (mask_probs, in 0..1: absolute bound only; clip_probs for
   per_clip's), proposals (pixel coordinates: relative bound only), features (p2..p5, queries,
   next_queries).
2. End to end (whole videos through the runtime's clip loop, queries carried across clips, slot
   resets and track ids as `evis run`): per video the backend's tracks are matched one to one to
   PyTorch's by video mask IoU (Hungarian); `track_count` = the largest |difference in the number of
   tracks| of a video, `class_agreement` = share of PyTorch tracks whose matched track has the same
   class (argmax of the class probabilities averaged over its visible frames; unmatched: disagree),
   `mask_iou` = mean over PyTorch tracks of the video mask IoU with the matched track (unmatched: 0;
   the minimum is reported too), `ap` = |AP(backend) - AP(PyTorch)| on the annotated videos (AP on
   the 0..1 scale of `evis eval`).

Default tolerances (TOLERANCES; `--tol-KEY V` sets KEY for every precision, `--tol fp32.KEY=V` for
one; `none` disables a check):

    key              fp32      fp16      int8
    logits_abs       1e-4      5e-2      -        per tensor: + logits_rel * max|ref|
    logits_rel       3e-5      1e-3      -        (fp32: kernel summation order, see below)
    probs_abs        1e-4      1e-2      -        mask probabilities, per graph (identical inputs)
    clip_probs_abs   1e-3      5e-2      -        mask probabilities of the whole clip (per_clip)
    proposals_abs    0         0         -
    proposals_rel    1e-5      1e-3      -        (pixels: relative)
    features_abs     1e-4      5e-2      -
    features_rel     1e-5      1e-3      -
    cosine           0.99999   0.999     0.98     per tensor, minimum
    track_count      0         0         1        end to end, max |difference| per video
    class_agreement  0.99      0.97      0.9      end to end, minimum
    mask_iou         0.99      0.97      0.9      end to end, minimum of the mean
    ap               0.001     0.005     0.01     end to end, max |ΔAP|

The graphs output mask probabilities (the sigmoid is inside), not mask logits. The logits of a
trained model reach |20|, and there float32 itself is the limit: against a float64 evaluation of
the same stage, PyTorch's float32 logits are 1.7e-4 off and ONNX Runtime's 2.2e-4, so no float32
pair can agree to 1e-4 absolute (docs/benchmarks.md). The probabilities, what the runtime pastes
and thresholds, agree to < 1e-4 per graph. Through a whole clip they differ more, and not by the
mask head: each stage's proposals carry the float differences of the stages before into the RoIs,
and a box 2e-4 px off moves a sharp mask edge's probability by about 1e-4 (model L: 1.1e-4 with
every mask graph at 8e-7), hence clip_probs_abs (the fp16 value is not measured yet). FP32
logits_rel is 3e-5 (not 1e-5) for the same reason as the logits' bound: the two
libraries' convolution kernels add in a different order. Real export bugs show up as errors of
1e-2 and more, and in the end-to-end checks.

JSON (`--json`, format_version 1): {command, format_version, created, package_version, machine,
checkpoint, model_dir, qdq_dir, engine_dirs, data {annotations, image_root, videos, frames,
clip_length, test_size, max_size}, reference {name, device, roi_align}, tolerances {precision:
{key: value}}, backends [{name, precision, runtime, providers, status (passed | failed | error |
skipped), reason, seconds, per_tensor {per_graph {graph: {output: stats}}, per_clip {output:
stats}}, end_to_end {videos, tracks_reference, tracks, track_count, class_agreement, mask_iou,
mask_iou_min, AP_reference, AP, delta_AP, delta_AP50, delta_AP75, per_video [...]}, checks [{check,
value, limit, op, passed}]}], passed, exit_code}; stats = {shape, max_abs, mean_abs, max_rel,
cosine, ref_max_abs, nonfinite, bound, passed}.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from efficientvis import __version__
from efficientvis.errors import UserError, one_line

FORMAT_VERSION = 1
TOL_KEYS = ("logits_abs", "logits_rel", "probs_abs", "clip_probs_abs", "proposals_abs", "proposals_rel", "features_abs",
            "features_rel", "cosine", "track_count", "class_agreement", "mask_iou", "ap")
TOLERANCES = {
    "fp32": {"logits_abs": 1e-4, "logits_rel": 3e-5, "probs_abs": 1e-4, "clip_probs_abs": 1e-3, "proposals_abs": 0.0,
             "proposals_rel": 1e-5, "features_abs": 1e-4, "features_rel": 1e-5, "cosine": 0.99999,
             "track_count": 0, "class_agreement": 0.99, "mask_iou": 0.99, "ap": 0.001},
    "fp16": {"logits_abs": 5e-2, "logits_rel": 1e-3, "probs_abs": 1e-2, "clip_probs_abs": 5e-2, "proposals_abs": 0.0,
             "proposals_rel": 1e-3, "features_abs": 5e-2, "features_rel": 1e-3, "cosine": 0.999,
             "track_count": 0, "class_agreement": 0.97, "mask_iou": 0.97, "ap": 0.005},
    "int8": {"logits_abs": None, "logits_rel": None, "probs_abs": None, "clip_probs_abs": None, "proposals_abs": None,
             "proposals_rel": None, "features_abs": None, "features_rel": None, "cosine": 0.98,
             "track_count": 1, "class_agreement": 0.9, "mask_iou": 0.9, "ap": 0.01},
}
CLIP_OUTPUTS = ("class_logits", "proposals", "mask_probs")  # backend keys: boxes = proposals


# ----------------------------------------------------------------------------------------------
# the backends this machine has (shared with `evis bench`)

@dataclass
class BackendSpec:
    name: str
    precision: str  # fp32 | fp16 | int8
    runtime: str  # onnxruntime | tensorrt | pytorch
    provider: str
    make: object = None  # () -> backend with the clip-loop interface
    skip: str = ""  # reason it cannot run here
    info: dict = field(default_factory=dict)


def tensorrt_version():
    """TensorRT's version where `import tensorrt` works, else None."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - a stub package raises anything at import
        return None
    return getattr(tensorrt, "__version__", "?")


def runtime_backends(model_dir, qdq_dir=None, engine_dirs=(), threads=0, manifest=None):
    """BackendSpecs of every runtime backend/precision; `skip` says why one cannot run here."""
    import onnxruntime as ort

    from efficientvis.runtime.ort_backend import OrtBackend

    available = set(ort.get_available_providers())
    trt = tensorrt_version()
    specs = []

    def ort_spec(name, precision, provider, **kw):
        def make():
            return OrtBackend(model_dir, provider=provider, threads=threads, manifest=manifest, **kw)
        return BackendSpec(name, precision, "onnxruntime", provider, make)

    specs.append(ort_spec("ort-fp32", "fp32", "cpu"))
    if os.path.isfile(os.path.join(model_dir, "model.onnx")):  # export --fused: one call per clip
        specs.append(ort_spec("ort-fp32-fused", "fp32", "cpu", fused=True))
    if qdq_dir:
        specs.append(ort_spec("ort-int8", "int8", "cpu", qdq_dir=qdq_dir))
        if os.path.isfile(os.path.join(qdq_dir, "model.onnx")):
            specs.append(ort_spec("ort-int8-fused", "int8", "cpu", qdq_dir=qdq_dir, fused=True))
    else:
        specs.append(BackendSpec("ort-int8", "int8", "onnxruntime", "cpu",
                                 skip="no --qdq DIR (Q/DQ graphs from `evis calibrate`)"))
    if "CUDAExecutionProvider" in available:
        specs.append(ort_spec("ort-cuda-fp32", "fp32", "cuda"))
        if qdq_dir:
            specs.append(ort_spec("ort-cuda-int8", "int8", "cuda", qdq_dir=qdq_dir))
    else:
        specs.append(BackendSpec("ort-cuda-fp32", "fp32", "onnxruntime", "cuda",
                                 skip=f"no CUDAExecutionProvider in this onnxruntime {ort.__version__}"))
    trt_ep_skip = ("`import tensorrt` fails here" if trt is None else
                   "" if "TensorrtExecutionProvider" in available else
                   f"no TensorrtExecutionProvider in this onnxruntime {ort.__version__}")
    specs.append(ort_spec("ort-trt-fp16", "fp16", "tensorrt", fp16=True) if not trt_ep_skip else
                 BackendSpec("ort-trt-fp16", "fp16", "onnxruntime", "tensorrt", skip=trt_ep_skip))
    if qdq_dir and not trt_ep_skip:
        specs.append(ort_spec("ort-trt-int8", "int8", "tensorrt", qdq_dir=qdq_dir))
    for engine_dir in engine_dirs or ():
        label = os.path.basename(os.path.normpath(engine_dir))
        precision = _engine_precision(engine_dir)
        name = f"trt-{precision}" + (f"[{label}]" if len(engine_dirs) > 1 else "")
        if trt is None:
            specs.append(BackendSpec(name, precision, "tensorrt", "tensorrt",
                                     skip="`import tensorrt` fails here (TensorRT engines need it)"))
            continue

        def make(engine_dir=engine_dir):
            from efficientvis.runtime.trt_backend import TrtBackend
            return TrtBackend(engine_dir)
        specs.append(BackendSpec(name, precision, "tensorrt", f"TensorRT {trt}", make))
    if not engine_dirs:
        specs.append(BackendSpec("trt", "fp16", "tensorrt", "tensorrt",
                                 skip="no --engines DIR" + ("" if trt else "; `import tensorrt` fails here")))
    return specs


def _engine_precision(engine_dir):
    from efficientvis.runtime.trt_backend import ENGINE_SUFFIX, read_engine_metadata

    try:
        meta = read_engine_metadata(os.path.join(engine_dir, "backbone" + ENGINE_SUFFIX))
        precision = str(meta.get("precision", "fp16")).lower()
    except (UserError, OSError):
        precision = "fp16"
    return precision if precision in TOLERANCES else "fp16"


# ----------------------------------------------------------------------------------------------
# tensor statistics and checks

def tensor_kind(name):
    if name == "class_logits":
        return "logits"
    if name == "mask_probs":
        return "probs"
    if name in ("proposals", "boxes", "proposals_in"):
        return "proposals"
    return "features"


def _finite(x):
    return None if x is None or not math.isfinite(x) else float(x)


def tensor_stats(got, ref) -> dict:
    """Error statistics of `got` against the reference `ref` (float64 arithmetic)."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        return {"shape": list(ref.shape), "got_shape": list(got.shape), "max_abs": None, "mean_abs": None,
                "max_rel": None, "cosine": None, "ref_max_abs": None, "nonfinite": 0}
    a, b = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    nonfinite = int((~np.isfinite(a)).sum() - (~np.isfinite(b)).sum())
    if a.size == 0:
        return {"shape": list(ref.shape), "max_abs": 0.0, "mean_abs": 0.0, "max_rel": 0.0, "cosine": 1.0,
                "ref_max_abs": 0.0, "nonfinite": 0}
    diff = np.abs(a - b)
    ref_max = float(np.abs(b).max())
    floor = max(1e-3 * ref_max, 1e-30)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cosine = float(a @ b / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    return {"shape": list(ref.shape), "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "max_rel": float((diff / np.maximum(np.abs(b), floor)).max()), "cosine": cosine,
            "ref_max_abs": ref_max, "nonfinite": max(nonfinite, 0)}


def merge_stats(a, b):
    """Worst case of two stats of the same tensor (over clips)."""
    if a is None:
        return b
    out = dict(a)
    for key in ("max_abs", "max_rel", "ref_max_abs", "nonfinite"):
        vals = [v for v in (a.get(key), b.get(key)) if v is not None]
        out[key] = max(vals) if vals else None
    if a.get("mean_abs") is not None and b.get("mean_abs") is not None:
        out["mean_abs"] = max(a["mean_abs"], b["mean_abs"])
    vals = [v for v in (a.get("cosine"), b.get("cosine")) if v is not None]
    out["cosine"] = min(vals) if vals else None
    if "got_shape" in b:
        out["got_shape"] = b["got_shape"]
    return out


def judge_tensor(stats, name, tol, chained=False) -> list:
    """Checks of one tensor's stats against a precision's tolerances (stats get bound/passed).
    `chained`: an output of the whole clip run inside the backend (per_clip), whose mask
    probabilities are judged by clip_probs_abs."""
    kind = "clip_probs" if chained and tensor_kind(name) == "probs" else tensor_kind(name)
    checks = []
    if "got_shape" in stats:
        checks.append(("shape", str(stats["got_shape"]), str(stats["shape"]), "==", False))
    elif stats.get("nonfinite"):
        checks.append(("nonfinite", stats["nonfinite"], 0, "==", False))
    else:
        atol, rtol = tol.get(f"{kind}_abs"), tol.get(f"{kind}_rel")
        if atol is not None or rtol is not None:
            bound = (atol or 0.0) + (rtol or 0.0) * stats["ref_max_abs"]
            stats["bound"] = bound
            checks.append(("max_abs", stats["max_abs"], bound, "<=", stats["max_abs"] <= bound))
        if tol.get("cosine") is not None:
            checks.append(("cosine", stats["cosine"], tol["cosine"], ">=", stats["cosine"] >= tol["cosine"]))
    stats["passed"] = all(c[4] for c in checks)
    return checks


# ----------------------------------------------------------------------------------------------
# end to end: tracks of whole videos

def _rle_bytes(rle):
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def track_summary(collector):
    """{track id: (class index, {frame: RLE bytes})} of a TrackCollector's visible tracks, each
    labelled with the argmax of its class scores (the scoring rule's average over visible frames)."""
    ids, scores = collector.track_scores()
    return {k: (int(np.argmax(s)), {t: _rle_bytes(r) for t, r in collector.track_masks(k).items()})
            for k, s in zip(ids, scores)}


def compare_tracks(ref, got) -> dict:
    """Match the tracks of one video (track_summary of the reference and of a backend) by video
    mask IoU (Hungarian) -> {tracks_reference, tracks, ious [per reference track], class_agree}."""
    from pycocotools import mask as mask_utils
    from scipy.optimize import linear_sum_assignment

    r_ids, g_ids = sorted(ref), sorted(got)
    R, G = len(r_ids), len(g_ids)
    inter = np.zeros((R, G))
    r_area = np.array([sum(float(mask_utils.area(m)) for m in ref[i][1].values()) for i in r_ids])
    g_area = np.array([sum(float(mask_utils.area(m)) for m in got[j][1].values()) for j in g_ids])
    for i, ri in enumerate(r_ids):
        for j, gj in enumerate(g_ids):
            common = set(ref[ri][1]) & set(got[gj][1])
            inter[i, j] = sum(float(mask_utils.area(mask_utils.merge([ref[ri][1][t], got[gj][1][t]],
                                                                     intersect=True))) for t in common)
    union = r_area[:, None] + g_area[None, :] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    ious, agree = [0.0] * R, [False] * R
    if R and G:
        rows, cols = linear_sum_assignment(-iou)
        for i, j in zip(rows, cols):
            if iou[i, j] > 0:
                ious[i] = float(iou[i, j])
                agree[i] = ref[r_ids[i]][0] == got[g_ids[j]][0]
    return {"tracks_reference": R, "tracks": G, "ious": ious, "class_agree": agree}


# ----------------------------------------------------------------------------------------------
# the command

def add_arguments(p):
    p.add_argument("--checkpoint", help="checkpoint (.pt): the PyTorch reference")
    p.add_argument("--model", metavar="MODEL_DIR", help="its export (`evis export`)")
    p.add_argument("--qdq", metavar="QDQ_DIR", help="INT8 Q/DQ graphs (`evis calibrate`)")
    p.add_argument("--engines", metavar="ENGINE_DIR", action="append", default=[],
                   help="TensorRT engines (`evis build`); repeatable (e.g. FP16 and INT8)")
    p.add_argument("--data", metavar="DIR", help="YouTube-VIS folder: JPEGImages/ + annotations.json")
    p.add_argument("--ann", help="annotation file (default DIR/annotations.json)")
    p.add_argument("--videos", type=int, default=0, metavar="N", help="first N videos (default all)")
    p.add_argument("--clips", type=int, default=2, metavar="N",
                   help="clips compared tensor by tensor on identical inputs (default 2)")
    p.add_argument("--clip", type=int, default=0, metavar="T",
                   help="frames per clip, 1..the exported T (default the exported T, as evis run)")
    p.add_argument("--size", type=int, default=0, metavar="S",
                   help="shortest side of the model input (default the model's test size; the longest "
                        "side limit scales with it)")
    p.add_argument("--backends", default="", metavar="A,B",
                   help="only these backends (names as in the table, e.g. ort-fp32,ort-int8)")
    p.add_argument("--threads", type=int, default=0, help="threads for PyTorch and ONNX Runtime (0: default)")
    p.add_argument("--device", default="cpu", help="device of the PyTorch reference (default cpu)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    for key in TOL_KEYS:
        p.add_argument(f"--tol-{key.replace('_', '-')}", dest=f"tol_{key}", default=None, metavar="V",
                       help=f"{key} for every precision (default fp32 {TOLERANCES['fp32'][key]}, "
                            f"int8 {TOLERANCES['int8'][key]}; 'none' disables)")
    p.add_argument("--tol", action="append", default=[], metavar="PREC.KEY=V",
                   help="one precision's tolerance, e.g. --tol int8.ap=0.02")
    files = p.add_argument_group("results files (instead of --checkpoint/--model: compare two finished runs "
                                 "end to end, e.g. `evis infer` against `evis run --dataset`)")
    files.add_argument("--results", metavar="GOT.json", help="results file to check")
    files.add_argument("--reference", metavar="REF.json", help="results file it must match")
    files.add_argument("--precision", choices=sorted(TOLERANCES), default="fp32",
                       help="whose tolerances apply (default fp32)")


def _tol_value(text, where):
    if str(text).lower() in ("none", "off", "-"):
        return None
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{where}: not a number: {text!r}") from None


def tolerances_from_args(args) -> dict:
    tol = {p: dict(v) for p, v in TOLERANCES.items()}
    for key in TOL_KEYS:
        value = getattr(args, f"tol_{key}", None)
        if value is not None:
            for p in tol:
                tol[p][key] = _tol_value(value, f"--tol-{key.replace('_', '-')}")
    for item in args.tol:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"--tol {item!r}: expected PRECISION.KEY=VALUE, e.g. int8.ap=0.02")
        dotted, value = item.split("=", 1)
        prec, key = dotted.split(".", 1)
        key = key.replace("-", "_")
        if prec not in tol or key not in TOL_KEYS:
            raise UserError(f"--tol {item!r}: precision one of {', '.join(tol)}, key one of {', '.join(TOL_KEYS)}")
        tol[prec][key] = _tol_value(value, f"--tol {item}")
    return tol


def _data(args, num_classes, class_names):
    from efficientvis.runtime.dataset import load_split
    from efficientvis.ytvis import format as ytvis_format

    gt, ann, image_root = load_split(args.data, args.ann, "--data", class_names, "checkpoint's")
    if len(gt.category_ids) != num_classes:
        raise UserError(f"{ann}: {len(gt.category_ids)} categories, the model has {num_classes} classes")
    ids = list(gt.videos)[: args.videos or None]
    if not ids:
        raise UserError(f"{ann}: no videos")
    return gt.subset(ids), ann, image_root


def _check_pair(model, cfg, manifest, checkpoint, model_dir):
    """UserError when MODEL_DIR is not an export of CKPT (sizes or q* differ)."""
    mc = cfg.model
    pairs = {"N": (mc.num_queries, manifest.num_queries), "C": (mc.hidden_dim, manifest.hidden_dim),
             "M": (mc.num_iterations, manifest.num_stages), "K": (mc.num_classes, manifest.num_classes),
             "carry_threshold": (float(mc.carry_threshold) if mc.carry_proposals else None,
                                 manifest.carry_threshold)}
    bad = [f"{k} {a} vs {b}" for k, (a, b) in pairs.items() if a != b]
    q = model.init_queries.weight.detach().float().cpu().numpy()
    if not bad and not np.allclose(q, manifest.initial_queries, rtol=0, atol=1e-6):
        bad.append("q* (initial_queries.npy) differs")
    if bad:
        raise UserError(f"{model_dir} is not an export of {checkpoint}: {'; '.join(bad)}")


def _first_clips(gt, image_root, options, count):
    """(T, 3, h, w) uint8 model inputs of the first `count` clips of the data (video order)."""
    from efficientvis.runtime.clip_loop import clip_frames
    from efficientvis.runtime.preprocess import preprocess_frames
    from efficientvis.runtime.dataset import video_frames

    clips = []
    for video in gt.videos.values():
        for clip in clip_frames(video_frames(video, image_root), options.clip_length):
            clips.append((video.id, preprocess_frames(clip, options.size, options.max_size)))
            if len(clips) == count:
                return clips
    return clips


def per_graph_parity(backend, model, manifest, clips, roi_form):
    """{graph: {output: worst stats over the clips}} of an OrtBackend's graphs on PyTorch's inputs."""
    from efficientvis.export.export import clip_start, torch_reference
    from efficientvis.runtime.carry import carried_proposals
    from efficientvis.runtime.postprocess import sigmoid

    sessions = getattr(backend, "sessions", None)
    if not sessions:
        return None
    q_star = manifest.initial_queries
    result = {}
    queries, carried, last_video = None, None, None
    for video_id, frames in clips:
        if video_id != last_video:
            queries, carried, last_video = q_star, None, video_id
        ref, feeds = torch_reference(model, frames, clip_start(queries, frames, carried), roi_form)
        for graph, session in sessions.items():
            names = {i.name for i in session.get_inputs()}
            outputs = [o.name for o in session.get_outputs()]
            got = dict(zip(outputs, session.run(outputs, {k: v for k, v in feeds[graph].items() if k in names})))
            for out_name in outputs:
                if out_name in ref[graph]:
                    g = result.setdefault(graph, {})
                    g[out_name] = merge_stats(g.get(out_name), tensor_stats(got[out_name], ref[graph][out_name]))
        last = ref[f"stage_{manifest.num_stages - 1}"]
        queries = last["next_queries"]
        if manifest.carry_threshold is not None:  # no slot resets within these few clips
            carried = carried_proposals(sigmoid(last["class_logits"]), last["proposals"],
                                        manifest.carry_threshold, np.zeros(len(queries), bool))
    return result


def per_clip_parity(backend, reference, frames):
    """Stats of the first clip's outputs through the backend's own clip interface (q* in)."""
    reference.start_video()
    backend.start_video()
    ref = reference.run_clip(frames, None)
    got = backend.run_clip(frames, None)
    key = {"proposals": "boxes"}
    return {n: tensor_stats(got[key.get(n, n)], ref[key.get(n, n)]) for n in CLIP_OUTPUTS}


def run_videos(backend, gt, image_root, options, frames_cache):
    """Whole videos through the clip loop -> {video id: TrackCollector}."""
    from efficientvis.runtime.dataset import run_video, video_frames

    num_classes = len(gt.category_ids)
    out = {}
    for vid, video in gt.videos.items():
        if vid not in frames_cache:
            frames_cache.clear()  # one video's frames in memory at a time
            frames_cache[vid] = list(video_frames(video, image_root))
        out[vid] = run_video(backend, iter(frames_cache[vid]), video.length, options, num_classes)
    return out


def summarise_runs(collectors, gt, top_k):
    """{video id: TrackCollector} -> ({video id: track_summary}, results list); the collectors
    are closed."""
    tracks, results = {}, []
    for vid, collector in collectors.items():
        with collector:
            tracks[vid] = track_summary(collector)
            results += list(collector.results(vid, gt.category_ids, top_k))
    return tracks, results


def results_track_summaries(gt, results, path):
    """A YouTube-VIS results list -> {video id: {track: (category id, {frame: RLE bytes})}}.

    Tracks as `metric.track_entries` finds them, labelled with the category of their highest-scoring
    entry (the argmax of the averaged class probabilities, as `track_summary` labels a collector's
    track)."""
    from efficientvis.ytvis.metric import track_entries

    return {vid: {k: (d.category_id, {t: r for t, r in enumerate(d.rles) if r is not None})
                  for k, d in enumerate(dets)} for vid, dets in track_entries(gt, results, path).items()}


def end_to_end(ref_tracks, got_tracks, gt, got_results, ref_metrics):
    """ref_tracks, got_tracks: {video id: track summary}; got_results: the backend's results list."""
    from efficientvis.ytvis.metric import evaluate

    per_video, ious, agree = [], [], []
    for vid in gt.videos:
        c = compare_tracks(ref_tracks.get(vid, {}), got_tracks.get(vid, {}))
        per_video.append({"video_id": vid, "tracks_reference": c["tracks_reference"], "tracks": c["tracks"],
                          "mask_iou_mean": float(np.mean(c["ious"])) if c["ious"] else None,
                          "class_agreement": float(np.mean(c["class_agree"])) if c["class_agree"] else None})
        ious += c["ious"]
        agree += c["class_agree"]
    metrics = evaluate(gt, got_results)
    return {"videos": len(gt.videos),
            "tracks_reference": sum(v["tracks_reference"] for v in per_video),
            "tracks": sum(v["tracks"] for v in per_video),
            "track_count": max(abs(v["tracks"] - v["tracks_reference"]) for v in per_video),
            "class_agreement": float(np.mean(agree)) if agree else None,
            "mask_iou": float(np.mean(ious)) if ious else None,
            "mask_iou_min": float(np.min(ious)) if ious else None,
            "AP_reference": ref_metrics["AP"], "AP": metrics["AP"],
            "delta_AP": metrics["AP"] - ref_metrics["AP"],
            "delta_AP50": metrics["AP50"] - ref_metrics["AP50"],
            "delta_AP75": metrics["AP75"] - ref_metrics["AP75"],
            "metrics": metrics, "per_video": per_video}


def judge_end_to_end(e2e, tol) -> list:
    checks = []
    if tol.get("track_count") is not None:
        checks.append(("track_count", e2e["track_count"], tol["track_count"], "<=",
                       e2e["track_count"] <= tol["track_count"]))
    for key in ("class_agreement", "mask_iou"):
        if tol.get(key) is not None and e2e[key] is not None:
            checks.append((key, e2e[key], tol[key], ">=", e2e[key] >= tol[key]))
    if tol.get("ap") is not None:
        delta = abs(e2e["delta_AP"])
        checks.append(("ap", delta, tol["ap"], "<=", delta <= tol["ap"]))
    return checks


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.6f}" if 1e-3 <= abs(v) < 1e4 and abs(v - round(v, 6)) < 1e-12 else f"{v:.3g}"
    return str(v)


def _fmt_cos(v):
    return "-" if v is None else f"{v:.8f}"


def format_report(report) -> str:
    lines = []
    ref = report["reference"]
    data = report["data"]
    if report.get("mode") == "files":
        lines.append(f"evis parity: results files, end to end on {len(data['videos'])} video(s), "
                     f"{data['frames']} frames; reference {ref['path']}")
    else:
        lines.append(f"evis parity: PyTorch ({ref['device']}) vs each backend on {len(data['videos'])} video(s), "
                     f"{data['frames']} frames, clips of {data['clip_length']}; per tensor on the first "
                     f"{data['clips_per_tensor']} clip(s)")
    header = f"  {'broken check':<48} {'value':>10}  {'limit':>13}"
    for b in report["backends"]:
        title = f"{b['name']} ({b['precision']}, {b['runtime']}"
        title += f", {', '.join(b['providers'])})" if b.get("providers") else ")"
        if b["status"] == "skipped":
            lines.append(f"- {title}: skipped ({b['reason']})")
            continue
        lines.append(f"- {title}: {b['status'].upper()}" + (f" ({b['reason']})" if b.get("reason") else ""))
        if b["status"] == "error":
            continue
        pt = b.get("per_tensor") or {}
        rows = []
        for graph, outs in (pt.get("per_graph") or {}).items():
            for name, s in outs.items():
                rows.append((f"{graph}/{name}", s))
        for name, s in (pt.get("per_clip") or {}).items():
            rows.append((f"clip/{name}", s))
        if rows:
            lines.append(f"  {'tensor':<30} {'max abs':>10} {'mean abs':>10} {'max rel':>10} {'cosine':>12} "
                         f"{'bound':>10}  ok")
            for label, s in rows:
                lines.append(f"  {label:<30} {_fmt(s.get('max_abs')):>10} {_fmt(s.get('mean_abs')):>10} "
                             f"{_fmt(s.get('max_rel')):>10} {_fmt_cos(s.get('cosine')):>12} "
                             f"{_fmt(s.get('bound')):>10}  {'ok' if s.get('passed') else 'FAIL'}")
        e = b.get("end_to_end")
        if e:
            who = "reference" if report.get("mode") == "files" else "PyTorch"
            lines.append(f"  end to end: tracks {e['tracks']} ({who} {e['tracks_reference']}), class agreement "
                         f"{_fmt(e['class_agreement'])}, mask IoU mean {_fmt(e['mask_iou'])} (min "
                         f"{_fmt(e['mask_iou_min'])}), AP {e['AP']:.4f} ({who} {e['AP_reference']:.4f}, "
                         f"ΔAP {e['delta_AP']:+.4f})")
        failed = [c for c in b["checks"] if not c["passed"]]
        if failed:
            lines.append(header)
        for c in failed:
            lines.append(f"  {c['check']:<48} {_fmt(c['value']):>10}  {c['op']} {_fmt(c['limit']):>10}")
        lines.append(f"  {len(b['checks']) - len(failed)}/{len(b['checks'])} checks passed")
    lines.append(("PASSED" if report["passed"] else "FAILED") + f": {report['summary']}")
    return "\n".join(lines)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return _finite(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_json(path, report):
    from efficientvis.ytvis.results import write_json_atomic

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(path, _json_safe(report))


def machine_info(threads):
    import onnxruntime as ort
    import torch

    return {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "onnxruntime_providers": ort.get_available_providers(), "tensorrt": tensorrt_version(),
            "threads": threads or torch.get_num_threads()}


def run_files(args, tol) -> int:
    """End-to-end parity of two results files on the annotations of --ann / --data."""
    from efficientvis.ytvis import format as ytvis_format
    from efficientvis.ytvis.metric import evaluate

    if not (args.results and args.reference):
        raise UserError("comparing results files needs both --results GOT.json and --reference REF.json")
    if not (args.ann or args.data):
        raise UserError("comparing results files needs the annotations: --ann FILE or --data DIR")
    ann = args.ann or os.path.join(args.data, "annotations.json")
    gt = ytvis_format.load(ann)
    loaded = {p: ytvis_format.read_json(p, "results file") for p in (args.reference, args.results)}
    ref_metrics = evaluate(gt, loaded[args.reference], args.reference)
    e2e = end_to_end(results_track_summaries(gt, loaded[args.reference], args.reference),
                     results_track_summaries(gt, loaded[args.results], args.results),
                     gt, loaded[args.results], ref_metrics)
    checks = [{"check": f"end_to_end.{c[0]}", "value": c[1], "limit": c[2], "op": c[3], "passed": bool(c[4])}
              for c in judge_end_to_end(e2e, tol[args.precision])]
    failed = [c["check"] for c in checks if not c["passed"]]
    report = {
        "command": "parity", "mode": "files", "format_version": FORMAT_VERSION, "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {"annotations": ann, "videos": list(gt.videos),
                 "frames": sum(v.length for v in gt.videos.values())},
        "reference": {"name": "reference", "path": args.reference, "metrics": ref_metrics},
        "tolerances": tol,
        "backends": [{"name": "results", "path": args.results, "precision": args.precision, "runtime": "file",
                      "providers": [], "status": "failed" if failed else "passed",
                      "reason": f"{len(failed)} check(s) broken: " + ", ".join(failed) if failed else "",
                      "checks": checks, "end_to_end": e2e}],
        "passed": not failed, "exit_code": 1 if failed else 0,
        "summary": f"{args.results} vs {args.reference}: " + ("broke a tolerance" if failed else "within tolerance"),
    }
    print(format_report(_json_safe(report)))
    if args.json:
        write_json(args.json, report)
        print(f"json: {args.json}")
    return report["exit_code"]


def run(args) -> int:
    if args.results or args.reference:
        return run_files(args, tolerances_from_args(args))
    if not (args.checkpoint and args.model and args.data):
        raise UserError("evis parity needs --checkpoint CKPT --model MODEL_DIR --data DIR "
                        "(or --results GOT.json --reference REF.json --ann FILE to compare results files)")
    import torch

    from efficientvis.runtime import manifest as manifest_lib
    from efficientvis.training.infer import TorchBackend, load_model, loop_options
    from efficientvis.ytvis.metric import evaluate

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clips < 0 or args.videos < 0:
        raise UserError("--clips and --videos must be >= 0")
    tol = tolerances_from_args(args)
    manifest = manifest_lib.load(args.model)
    from efficientvis.training.train import pick_device
    model, cfg, class_names = load_model(args.checkpoint, pick_device(args.device))
    # a float32 reference on a GPU too: cuDNN's convolutions default to TF32 on Ampere and later
    # (Jetson Orin included), 10-bit mantissas that would be charged to the backends under test
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_pair(model, cfg, manifest, args.checkpoint, args.model)
    gt, ann, image_root = _data(args, cfg.model.num_classes, class_names or manifest.class_names)
    options = loop_options(cfg)
    if not 0 <= args.clip <= manifest.clip_length:
        raise UserError(f"--clip must be between 1 and the exported T = {manifest.clip_length}, got {args.clip}")
    if args.size < 0:
        raise UserError(f"--size must be positive, got {args.size}")
    if args.size:
        options.max_size = round(options.max_size * args.size / options.size) if options.max_size else 0
        options.size = args.size
    options.clip_length = args.clip or manifest.clip_length  # what `evis run` runs by default
    top_k = cfg.infer.top_k
    roi_form = manifest.data.get("roi_align", "roialign")
    reference = TorchBackend(model, next(model.parameters()).device)

    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    specs = runtime_backends(args.model, args.qdq, args.engines, args.threads, manifest)
    if wanted:
        unknown = [w for w in wanted if w not in {s.name for s in specs}]
        if unknown:
            raise UserError(f"--backends: unknown {', '.join(unknown)} (known: {', '.join(s.name for s in specs)})")
        specs = [s for s in specs if s.name in wanted]

    clips = _first_clips(gt, image_root, options, args.clips) if args.clips else []
    frames_cache = {}
    print(f"evis parity: PyTorch reference over {len(gt.videos)} video(s) ...", file=sys.stderr, flush=True)
    ref_tracks, ref_results = summarise_runs(run_videos(reference, gt, image_root, options, frames_cache),
                                             gt, top_k)
    ref_metrics = evaluate(gt, ref_results)

    backends = []
    for spec in specs:
        entry = {"name": spec.name, "precision": spec.precision, "runtime": spec.runtime,
                 "providers": [], "status": "skipped", "reason": spec.skip, "checks": []}
        backends.append(entry)
        if spec.skip:
            continue
        t0 = time.perf_counter()
        print(f"evis parity: {spec.name} ...", file=sys.stderr, flush=True)
        try:
            backend = spec.make()
            entry["providers"] = list(backend.providers_in_use()) if hasattr(backend, "providers_in_use") else []
            checks, ptol = [], tol[spec.precision]
            per_tensor = {}
            if clips:
                per_graph = per_graph_parity(backend, model, manifest, clips, roi_form)
                if per_graph is not None:
                    per_tensor["per_graph"] = per_graph
                    for graph, outs in per_graph.items():
                        for name, stats in outs.items():
                            checks += [(f"per_graph.{graph}.{name}.{c[0]}", *c[1:])
                                       for c in judge_tensor(stats, name, ptol)]
                per_clip = per_clip_parity(backend, reference, clips[0][1])
                per_tensor["per_clip"] = per_clip
                for name, stats in per_clip.items():
                    checks += [(f"per_clip.{name}.{c[0]}", *c[1:])
                               for c in judge_tensor(stats, name, ptol, chained=True)]
            entry["per_tensor"] = per_tensor
            got_tracks, got_results = summarise_runs(run_videos(backend, gt, image_root, options, frames_cache),
                                                     gt, top_k)
            entry["end_to_end"] = e2e = end_to_end(ref_tracks, got_tracks, gt, got_results, ref_metrics)
            checks += [(f"end_to_end.{c[0]}", *c[1:]) for c in judge_end_to_end(e2e, ptol)]
            entry["checks"] = [{"check": c[0], "value": c[1], "limit": c[2], "op": c[3], "passed": bool(c[4])}
                               for c in checks]
            failed = [c["check"] for c in entry["checks"] if not c["passed"]]
            entry["status"] = "failed" if failed else "passed"
            entry["reason"] = (f"{len(failed)} check(s) broken: " + ", ".join(failed[:5])
                               + (" ..." if len(failed) > 5 else "")) if failed else ""
            if hasattr(backend, "close"):
                backend.close()
        except Exception as e:  # noqa: BLE001 - a backend that crashes is a failed backend, not a traceback
            entry["status"], entry["reason"] = "error", one_line(e)
        entry["seconds"] = round(time.perf_counter() - t0, 2)

    ran = [b for b in backends if b["status"] != "skipped"]
    bad = [b["name"] for b in ran if b["status"] != "passed"]
    passed = not bad
    report = {
        "command": "parity", "format_version": FORMAT_VERSION, "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads),
        "checkpoint": args.checkpoint, "model_dir": args.model, "qdq_dir": args.qdq,
        "engine_dirs": list(args.engines),
        "data": {"annotations": ann, "image_root": image_root, "videos": list(gt.videos),
                 "frames": sum(v.length for v in gt.videos.values()), "clip_length": options.clip_length,
                 "test_size": options.size, "max_size": options.max_size, "clips_per_tensor": len(clips)},
        "reference": {"name": "pytorch", "device": str(args.device), "roi_align": roi_form,
                      "metrics": ref_metrics},
        "tolerances": tol,
        "backends": backends,
        "passed": passed, "exit_code": 0 if passed else 1,
        "summary": (f"{len(ran)} backend(s) compared, " +
                    (f"{', '.join(bad)} broke a tolerance" if bad else "all within tolerance") +
                    f"; skipped: {', '.join(b['name'] for b in backends if b['status'] == 'skipped') or 'none'}"),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if not ran:
        report["summary"] = "no backend could run here; " + report["summary"]
    print(format_report(_json_safe(report)))
    if args.json:
        write_json(args.json, report)
        print(f"json: {args.json}")
    return report["exit_code"]
