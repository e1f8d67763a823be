"""`evis bench`: latency, FPS, work and memory of PyTorch eager and every runtime backend on this
machine, on the same model and the same input, side by side.

    evis bench --checkpoint CKPT [--model MODEL_DIR] [--qdq QDQ_DIR] [--engines ENGINE_DIR]
    evis bench --config r50_ytvis19 --random-weights
               [--size 360x640] [--clip 9] [--stages K] [--threads N] [--warmup 2] [--iters 10]
               [--sweep-T 1,3,6,9] [--sweep-size 240x426,360x640] [--channels-last]
               [--backends pytorch,ort-fp32,...] [--sequential] [--json out.json] [--plot out.png]

Model: a checkpoint (its export is `--model`, or made once into the cache folder, keyed by the
checkpoint's sha256), or `--random-weights --config NAME`: the config's model with random weights
(seed 0; class biases 0, so every query slot is a track and post-processing does its largest work),
saved and exported once into `--cache-dir` (default ~/.cache/efficientvis/bench, keyed by a hash of
the config, the seed and the torch/onnx/efficientvis versions): the paper's size without a
checkpoint.

Input: one clip of T synthetic frames (ytvis.synth) at the source size (default twice the model
input per side, as a 720p YouTube-VIS video for 360x640), the same clip every iteration.
Per iteration (warm-up iterations are not counted), the parts are timed separately:

    preprocess   resize + BGR->RGB + (T, 3, H, W) uint8 (runtime/preprocess.py, as `evis run`)
    backbone     backbone graph / module
    stage_k      each query-video iteration k < K (anytime inference: K = --stages), without masks
    mask_head    the mask head of the last stage run (mask_{K-1}: masks are computed once per clip)
    fused_graph  model.onnx (ort-*-fused rows, where MODEL_DIR has it): backbone + all M stages + mask head
    backend      a TensorRT engine folder, timed as a whole
    outputs_to_host  last stage's outputs to numpy (device copies on a GPU)
    postprocess  class sigmoid, boxes to source pixels, slot tracker, masks pasted at source resolution
                 (the steps of runtime/clip_loop.run_clips after the backend)
    model        wall time of the backend's part (backbone + stages + mask head, host copies included)
    clip         preprocess + model + postprocess (end to end)

PyTorch runs the very modules the ONNX graphs were exported from (export/graphs.py) in eager mode
(`--channels-last` adds a channels_last copy); ONNX Runtime runs the sessions of `OrtBackend` as
`evis run` does (same options; `--threads` = intra_op_num_threads). The recurrent queries are
carried from one iteration to the next. A cached export (checkpoint without --model, random
weights) has the fused model.onnx too: the split graphs joined in one graph, with what the outputs
do not need pruned (the class heads of stages 0..M-2): the same work as the split graphs, in one call.
Order: every backend is loaded and warmed up first, then timed one clip each in turn (round robin,
--iters rounds), so that when a machine's speed drifts during the run (a shared VM, another
process, thermal limits) every backend is timed over the same minutes rather than each over its
own; one ratio per round (back-to-back clips) shows the spread. A drift need not slow every
backend by the same factor (on a busy 2-core VM PyTorch eager slowed more than ONNX Runtime), so
compare runs of similar load. `--sequential` times each backend alone and frees it before the next.
A backend that fails is reported as an error in one line; the others go on.
Statistics per part: mean, p50, p90, p99, min (ms per clip); per frame = per clip / T; FPS model-only
(T / model) and end to end (T / clip). Memory: VmHWM, the process's peak RSS, reset through
/proc/self/clear_refs before each backend is created (without clear_refs: ru_maxrss, the peak of
the whole process). rss_increase_mb is that peak over the RSS before the backend was created, while
it was created and warmed up (round robin, with the backends before it loaded) or created and run
(`--sequential`, the others freed first; then also peak_rss_mb). Round robin: peak_rss_mb null and
process_peak_rss_mb, the peak with every backend loaded, over the timed rounds included.

Work: GFLOPs per clip counted by the analytic ONNX counter of export/flops.py (Conv, ConvTranspose,
MatMul, Gemm; 2 FLOPs per multiply-add; shapes from onnx shape inference at the benchmark's T, H, W
and K stages; for model.onnx on that graph); with PyTorch in the run also torch.utils.flop_counter.FlopCounterMode's count of the
same clip as a cross-check. Achieved GFLOP/s = GFLOPs / model time, also as a share of the machine's
float32 matmul rate, measured once at start (torch.mm 1024x1024, best of 5, same threads).

Sweeps: `--sweep-T` and `--sweep-size` rerun every backend at each value (warm-up + iterations);
the stage sweep (1..K) is derived from the per-stage times (backbone + stages 0..k-1 + the mask
head), since a stage's time does not depend on how many follow it.

JSON (format_version 1): {command, format_version, created, package_version, machine {platform,
cpu_count, threads, python, torch, onnxruntime, tensorrt, load_average, nice, matmul_gflops},
model {source, checkpoint, config, model_dir, qdq_dir, engine_dirs, roi_align, backbone, N, C, M, K}, settings {size [H, W],
source_size, clip, stages, warmup, iters, threads, order, peak_rss}, flops {method, per_clip, gflops_per_clip,
gflops_per_frame, graphs, torch_flop_counter, per_clip_fused}, backends [{name, runtime, precision,
provider, threads, status (ok | skipped | error), reason, graph_files {graph: file run}, latency_ms {part: {mean, p50, p90, p99,
min}}, per_frame_ms {model, clip}, fps {model, end_to_end}, gflops_per_clip, gflops_per_s,
matmul_rate_share, load_average {before, after}, peak_rss_mb,
rss_increase_mb, process_peak_rss_mb, model_ms_per_clip [ms of each timed clip], speedup_vs_pytorch {model, end_to_end}, instances_per_clip, stages_sweep
[{stages, model_ms, fps}]}], sweeps {T: [...], size: [...]} (rows {backend, T, H, W, model_ms,
clip_ms, fps_model, fps_end_to_end, gflops_per_clip, gflops_per_s}), ratios {name: value} (of the
means), ratios_per_round {name: {median, min, max, values}} (round robin: one ratio per round of
back-to-back clips), targets
[{name, target, measured, met}], plot, seconds}.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import numpy as np

from efficientvis import __version__
from efficientvis.errors import UserError, one_line

FORMAT_VERSION = 1
STATS = ("mean", "p50", "p90", "p99", "min")
# model-only clip throughput; the first two are always listed, the fused ones where measured
TARGETS = (("ort-fp32", "pytorch", 1.5), ("ort-int8", "ort-fp32", 2.0),
           ("ort-fp32-fused", "pytorch", 1.5), ("ort-int8-fused", "ort-fp32-fused", 2.0))
RANDOM_SEED = 0


# ----------------------------------------------------------------------------------------------
# machine: memory, matmul rate

def _proc_status_kb(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS of this process (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb():
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb():
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


def matmul_gflops(threads, n=1024, repeats=5) -> dict:
    """float32 matmul rate of this machine: torch.mm of two n x n matrices, best of `repeats`."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return {"value": round(2 * n ** 3 / best / 1e9, 2),
            "method": f"torch.mm float32 {n}x{n}, best of {repeats}, {threads} thread(s)"}


def machine_info(threads):
    import onnxruntime as ort
    import torch

    from efficientvis.export.parity import tensorrt_version

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": _cpu_name(),
            "cpu_count": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": ort.__version__,
            "onnxruntime_providers": ort.get_available_providers(), "tensorrt": tensorrt_version(),
            "load_average": load, "nice": os.nice(0)}


def _load():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# ----------------------------------------------------------------------------------------------
# models: checkpoint, random weights, cached exports

def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "efficientvis", "bench")


def _versions():
    """What a cached export depends on (a new manifest format invalidates it)."""
    import onnx
    import torch

    from efficientvis.export.export import EXPORT_REVISION
    from efficientvis.runtime.manifest import FORMAT_VERSION
    return {"torch": torch.__version__, "onnx": onnx.__version__, "efficientvis": __version__,
            "manifest_format": FORMAT_VERSION, "export_revision": EXPORT_REVISION}


def random_weights_key(cfg, seed=RANDOM_SEED) -> str:
    """Cache key of a random-weight model: config, seed and tool versions."""
    blob = json.dumps({"config": cfg.to_dict(), "seed": seed, "versions": _versions(),
                       "class_bias": 0.0}, sort_keys=True, default=str)
    return f"{cfg.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def random_weights_checkpoint(cfg, path, seed=RANDOM_SEED):
    """Save the config's model with random weights (seed; class biases 0: every slot a track)."""
    import torch

    from efficientvis.training import checkpoint
    from efficientvis.training.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for it in model.iterations:
            it.class_logits.bias.zero_()
    K = cfg.model.num_classes
    checkpoint.save(path, model=model.state_dict(), config=cfg.to_dict(),
                    class_names=[f"class_{k}" for k in range(1, K + 1)])
    return path


def _export_cached(checkpoint_path, folder, log, roi_form="roialign"):
    """MODEL_DIR = folder/model (folder/model_<form> for another --roi-align) with the split graphs
    and the fused model.onnx, exported once (a folder with a manifest is a complete export)."""
    from efficientvis.export.export import export_model

    model_dir = os.path.join(folder, "model" if roi_form == "roialign" else f"model_{roi_form}")
    if os.path.isfile(os.path.join(model_dir, "manifest.json")):
        log(f"using the cached export {model_dir}")
        add_fused_graph(model_dir, log)
        return model_dir
    log(f"exporting {checkpoint_path} -> {model_dir} (once; cached)")
    export_model(checkpoint_path, model_dir, roi_form=roi_form, fused=True, verify=False, log=log)
    return model_dir


def add_fused_graph(model_dir, log=print):
    """Add model.onnx (the split graphs joined in ONNX, as `evis export --fused` does) to an export
    that lacks it, and list it in its manifest."""
    import onnx

    from efficientvis.export import export as E
    from efficientvis.runtime import manifest as manifest_lib

    m = manifest_lib.load(model_dir)
    if "model" in m.graphs:
        return False
    t0 = time.perf_counter()
    backbone = onnx.load(m.path("backbone"))
    stages = [onnx.load(m.path(s)) for s in m.stages]
    mask_head = onnx.load(m.path(f"mask_{m.num_stages - 1}"))
    spec = E.graph_spec("model", m.num_queries, m.hidden_dim, m.num_classes, int(m.data.get("mask_size", 28)))
    proto = E.compose_fused(backbone, stages, mask_head, *spec)
    del backbone, stages, mask_head
    E._check(proto, "model.onnx")
    entry = E.save_graph(proto, model_dir, "model.onnx")
    data = dict(m.data)
    data["graphs"] = {**m.graphs, "model": {**entry, "inputs": spec[0], "outputs": spec[1],
                                            "nodes": len(proto.graph.node),
                                            "export_seconds": round(time.perf_counter() - t0, 2)}}
    manifest_lib.write(model_dir, data)
    log(f"added model.onnx (fused, {len(proto.graph.node)} nodes) to {model_dir}")
    return True


def _writable_cache(cache_dir):
    try:
        os.makedirs(cache_dir, exist_ok=True)
        probe = os.path.join(cache_dir, ".write-test")
        with open(probe, "w"):
            pass
        os.unlink(probe)
        return cache_dir
    except OSError:
        fallback = os.path.join("work_dirs", "bench_cache")
        os.makedirs(fallback, exist_ok=True)
        return fallback


def prepare_model(args, log):
    """(checkpoint path, MODEL_DIR, source description) from the arguments."""
    from efficientvis.runtime.manifest import sha256_of

    if args.model and args.roi_align != "roialign":
        raise UserError("--roi-align sets the form of the export evis bench makes; --model MODEL_DIR is "
                        "exported already (evis export --roi-align)")
    cache = _writable_cache(args.cache_dir or default_cache_dir())
    if args.random_weights:
        from efficientvis.training.config import load_config

        if not args.config:
            raise UserError("--random-weights needs --config NAME (e.g. r50_ytvis19)")
        if args.checkpoint:
            raise UserError("give either --checkpoint or --random-weights --config, not both")
        cfg = load_config(args.config)
        folder = os.path.join(cache, random_weights_key(cfg))
        os.makedirs(folder, exist_ok=True)
        ckpt = os.path.join(folder, "checkpoint.pt")
        if not os.path.isfile(ckpt):
            tmp = ckpt + ".tmp"
            random_weights_checkpoint(cfg, tmp)
            os.replace(tmp, ckpt)
        model_dir = args.model or _export_cached(ckpt, folder, log, args.roi_align)
        return ckpt, model_dir, f"random weights (config {args.config}, seed {RANDOM_SEED})"
    if not args.checkpoint:
        raise UserError("give --checkpoint CKPT, or --random-weights --config NAME")
    if not os.path.isfile(args.checkpoint):
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    if args.model:
        return args.checkpoint, args.model, "checkpoint"
    digest = hashlib.sha256((sha256_of(args.checkpoint) + json.dumps(_versions(), sort_keys=True))
                            .encode()).hexdigest()[:12]
    folder = os.path.join(cache, f"ckpt-{digest}")
    os.makedirs(folder, exist_ok=True)
    return args.checkpoint, _export_cached(args.checkpoint, folder, log, args.roi_align), "checkpoint"


# ----------------------------------------------------------------------------------------------
# runners: one clip, timed part by part

def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TorchRunner:
    """PyTorch eager on the modules the graphs are exported from (export/graphs.py)."""

    def __init__(self, model, device="cpu", channels_last=False, fp16=False):
        import torch

        from efficientvis.export import graphs as G

        self.torch, self.device, self.fp16 = torch, torch.device(device), fp16
        if self.device.type == "cuda":  # "fp32" means it: cuDNN's convolutions default to TF32 on Ampere+
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        if channels_last:
            model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        self.model = model.to(self.device).eval()
        self.num_stages = len(model.iterations)
        self.modules = {n: G.build_graph_module(self.model, n) for n in G.split_names(self.num_stages)}
        self.q_star = self.model.init_queries.weight.detach().clone()
        self.queries = None

    def start(self):
        self.queries = self.q_star.clone()

    def run(self, frames, stages):
        torch, dev = self.torch, self.device
        times = {}
        # fp16: autocast, as `evis train` runs on CUDA (AMP): float16 matmuls and convolutions
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16, enabled=self.fp16):
            t0 = time.perf_counter()
            x = torch.from_numpy(frames).to(dev)
            feats = self.modules["backbone"](x)
            _sync(torch, dev)
            times["backbone"] = time.perf_counter() - t0
            N = len(self.queries)
            # stage 0: q* (N, C), image size, no carried proposals (as the runtime's backends are
            # timed); then queries, proposals
            inputs = (self.queries, torch.tensor(frames.shape[-2:], dtype=torch.float32, device=dev),
                      torch.zeros(N, device=dev), torch.zeros(N, 4, device=dev))
            for k in range(stages):
                t0 = time.perf_counter()
                res = self.modules[f"stage_{k}"](*feats, *inputs)
                inputs = (res[0], res[1])
                _sync(torch, dev)
                times[f"stage_{k}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            mask_probs = self.modules[f"mask_{stages - 1}"](*feats, res[3], res[1])
            _sync(torch, dev)
            times["mask_head"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self.queries = res[4]
            out = {"class_logits": res[2].float().cpu().numpy(), "boxes": res[1].float().cpu().numpy(),
                   "mask_probs": mask_probs.float().cpu().numpy()}
            times["outputs_to_host"] = time.perf_counter() - t0
        return out, times


class OrtRunner:
    """An OrtBackend's clip forward, with the time of each part it runs."""

    def __init__(self, backend):
        self.backend = backend
        self.num_stages = backend.num_stages

    def start(self):
        self.backend.start_video()

    def run(self, frames, stages):
        times = {}
        out = self.backend.run_clip(frames, None, stages, times=times)
        return out, times


class WholeRunner:
    """Any clip-loop backend (TensorRT engines): timed as one part."""

    def __init__(self, backend):
        self.backend = backend
        self.num_stages = getattr(backend, "num_stages", 0)

    def start(self):
        self.backend.start_video()

    def run(self, frames, stages):
        t0 = time.perf_counter()
        out = self.backend.run_clip(frames, None, stages)
        return out, {"backend": time.perf_counter() - t0}


def postprocess(out, input_hw, source_hw, tracker):
    """The clip loop's work after the backend (runtime/clip_loop.run_clips): -> instances."""
    from efficientvis.runtime.postprocess import paste_mask, scale_boxes, sigmoid

    probs = sigmoid(out["class_logits"])
    height, width = source_hw
    boxes = scale_boxes(out["boxes"], input_hw, (height, width))
    masks = out["mask_probs"]
    ids, _ = tracker.update(probs)
    count = 0
    for t in range(probs.shape[1]):
        for n in np.nonzero(ids)[0]:
            if paste_mask(masks[n, t], boxes[n, t], height, width).any():
                count += 1
    return count


def summarize(values) -> dict:
    ms = np.asarray(values, np.float64) * 1000
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "min": float(ms.min())}


class ClipTimer:
    """One backend's clips, timed part by part: `warmup` clips first (not counted), then counted
    ones, one clip per step(). `evis bench` steps every backend in turn (round robin), so that
    every backend is timed over the same minutes of a machine whose speed drifts."""

    def __init__(self, runner, clip_bgr, size, max_size, stages, warmup, num_queries, options=None):
        from efficientvis.runtime.tracker import SlotTracker

        runner.start()
        self.runner, self.clip_bgr, self.size, self.max_size = runner, clip_bgr, size, max_size
        self.stages, self.warmup, self.done = stages, warmup, 0
        self.tracker = SlotTracker(num_queries, *(options or (0.2, 3)))
        self.records, self.instances, self.input_hw = {}, [], None
        self.source_hw = clip_bgr[0].shape[:2]

    def step(self):
        from efficientvis.runtime.preprocess import preprocess_frames

        t0 = time.perf_counter()
        inputs = preprocess_frames(self.clip_bgr, self.size, self.max_size)
        t1 = time.perf_counter()
        out, parts = self.runner.run(inputs, self.stages)
        t2 = time.perf_counter()
        n = postprocess(out, inputs.shape[-2:], self.source_hw, self.tracker)
        t3 = time.perf_counter()
        self.input_hw = tuple(int(v) for v in inputs.shape[-2:])
        self.done += 1
        if self.done <= self.warmup:
            return
        row = {"preprocess": t1 - t0, **parts, "postprocess": t3 - t2, "model": t2 - t1, "clip": t3 - t0}
        for k, v in row.items():
            self.records.setdefault(k, []).append(v)
        self.instances.append(n)

    def result(self):
        """{part: [seconds]} of the counted clips, model input (H, W), instances per clip."""
        return self.records, self.input_hw, float(np.mean(self.instances)) if self.instances else 0.0


def measure(runner, clip_bgr, size, max_size, stages, warmup, iters, num_queries, options=None):
    """One backend alone: warm-up + iters clips (ClipTimer.result())."""
    timer = ClipTimer(runner, clip_bgr, size, max_size, stages, warmup, num_queries, options)
    for _ in range(warmup + iters):
        timer.step()
    return timer.result()


# ----------------------------------------------------------------------------------------------
# input

def parse_size(text, what="--size"):
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise UserError(f"{what}: expected HxW, e.g. 360x640, got {text!r}") from None
    if h < 32 or w < 32:
        raise UserError(f"{what}: each side must be >= 32, got {text}")
    return h, w


def parse_ints(text, what):
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise UserError(f"{what}: values must be >= 1, got {text}")
    return values


def source_clip(frames, height, width):
    """`frames` BGR synthetic frames at source size (height, width)."""
    import cv2

    from efficientvis.ytvis.synth import iter_video_frames

    base_h, base_w = min(height, 360), min(width, 640)  # render small, scale up (content is not timed)
    clip = [f.image for f in iter_video_frames(frames=frames, height=max(base_h, 64), width=max(base_w, 64),
                                               seed=0, max_objects=4)]
    return [cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) if f.shape[:2] != (height, width)
            else f for f in clip]


# ----------------------------------------------------------------------------------------------
# the command

def add_arguments(p):
    p.add_argument("--checkpoint", help="checkpoint (.pt) written by evis train")
    p.add_argument("--model", metavar="MODEL_DIR",
                   help="its export (default: exported once into the cache folder)")
    p.add_argument("--qdq", metavar="QDQ_DIR", help="INT8 Q/DQ graphs (`evis calibrate`)")
    p.add_argument("--engines", metavar="ENGINE_DIR", action="append", default=[],
                   help="TensorRT engines (`evis build`), where `import tensorrt` works; repeatable")
    p.add_argument("--config", help="config name or YAML for --random-weights (e.g. r50_ytvis19)")
    p.add_argument("--random-weights", action="store_true",
                   help="benchmark the config's model with random weights (no checkpoint needed)")
    p.add_argument("--roi-align", default="roialign", metavar="FORM",
                   help="RoIAlign form of the export made here: roialign, gridsample or grouped (evis "
                        "export --roi-align; grouped is the fastest on ONNX Runtime, not for TensorRT; "
                        "default roialign)")
    p.add_argument("--cache-dir", help=f"random-weight models and exports (default {default_cache_dir()})")
    p.add_argument("--size", help="model input HxW (default: the model's test size at 16:9, e.g. 360x640)")
    p.add_argument("--source-size", help="source frames HxW (default: twice --size per side)")
    p.add_argument("--clip", type=int, default=0, metavar="T", help="frames per clip (default min(9, exported T))")
    p.add_argument("--stages", type=int, default=0, metavar="K", help="stages run (default all M)")
    p.add_argument("--threads", type=int, default=0,
                   help="PyTorch threads and ONNX Runtime intra-op threads (default: the CPU count)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up clips, not counted (default 2)")
    p.add_argument("--iters", type=int, default=10, help="timed clips (default 10)")
    p.add_argument("--sweep-T", default="", metavar="T1,T2", help="clip lengths to sweep, e.g. 1,3,6,9")
    p.add_argument("--sweep-size", default="", metavar="HxW,...", help="model input sizes to sweep")
    p.add_argument("--sweep-iters", type=int, default=0, help="timed clips per sweep point (default --iters)")
    p.add_argument("--sequential", action="store_true",
                   help="time each backend alone, one after the other, freeing it before the next (its "
                        "own peak memory; uses less memory) instead of one clip of each in turn (the "
                        "default: every backend is then timed over the same minutes of a machine whose speed drifts)")
    p.add_argument("--channels-last", action="store_true", help="also PyTorch eager with channels_last")
    p.add_argument("--backends", default="", metavar="A,B",
                   help="only these backends (pytorch, pytorch-channels-last, ort-fp32, ort-int8, ...)")
    p.add_argument("--no-flop-counter", action="store_true",
                   help="skip the FlopCounterMode cross-check of the ONNX FLOP count")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PNG", help="latency breakdown + FPS vs T plot")


def _fmt_ms(v):
    return "-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _rss(b):
    """The table's RSS MB: a backend's peak, or (round robin) what loading it added (+N)."""
    if b.get("peak_rss_mb") is not None:
        return f"{b['peak_rss_mb']:.0f}"
    return "-" if b.get("rss_increase_mb") is None else f"{b['rss_increase_mb']:+.0f}"


def format_table(report) -> str:
    m, s = report["machine"], report["settings"]
    fl = report["flops"]
    lines = [f"evis bench: {report['model']['description']}; input {s['size'][0]}x{s['size'][1]} "
             f"(source {s['source_size'][0]}x{s['source_size'][1]}), T={s['clip']}, {s['stages']}/"
             f"{report['model']['M']} stages, {s['threads']} thread(s), {s['warmup']} warm-up + "
             f"{s['iters']} timed clips" + (", one clip of each backend in turn" if
                                            s.get("order") == "round-robin" else ", backends one after the other"),
             f"machine: {m['processor']}, {m['cpu_count']} CPUs, load average {m['load_average']}, "
             f"nice {m['nice']}; float32 matmul {m['matmul_gflops']['value']:.1f} GFLOP/s; "
             f"{fl['gflops_per_clip']:.2f} GFLOPs/clip ({fl['method_short']})"]
    head = (f"{'backend':<22} {'provider':<22} {'clip ms':>9} {'p50':>9} {'p90':>9} {'p99':>9} {'ms/frame':>9} "
            f"{'FPS':>7} {'FPS e2e':>8} {'GFLOP/s':>8} {'RSS MB':>7} {'x PyTorch':>9}")
    lines += [head, "-" * len(head)]
    for b in report["backends"]:
        if b["status"] != "ok":
            lines.append(f"{b['name']:<22} {b['status']}: {b.get('reason', '')}")
            continue
        lat = b["latency_ms"]["model"]
        sp = (b.get("speedup_vs_pytorch") or {}).get("model")
        lines.append(f"{b['name']:<22} {b['provider'][:22]:<22} {_fmt_ms(lat['mean']):>9} {_fmt_ms(lat['p50']):>9} "
                     f"{_fmt_ms(lat['p90']):>9} {_fmt_ms(lat['p99']):>9} {_fmt_ms(b['per_frame_ms']['model']):>9} "
                     f"{b['fps']['model']:>7.2f} {b['fps']['end_to_end']:>8.2f} {b['gflops_per_s']:>8.1f} "
                     f"{_rss(b):>7} {('%.2f' % sp) if sp else '-':>9}")
    lines.append("(clip ms, p50/p90/p99, ms/frame, FPS: model only = backbone + stages; FPS e2e adds "
                 "preprocess + postprocess; RSS MB: " + ("+N: what loading and warming up the backend added" if
                                                        s.get("order") == "round-robin" else "peak") + ")")
    parts = [p for p in report["parts"] if p not in ("model", "clip")]
    lines.append("")
    lines.append("latency per part, mean ms per clip: " + ", ".join(parts))
    for b in report["backends"]:
        if b["status"] == "ok":
            lines.append(f"  {b['name']:<22} " + "  ".join(
                f"{p} {_fmt_ms(b['latency_ms'][p]['mean'])}" for p in parts if p in b["latency_ms"]))
    for key, rows in report["sweeps"].items():
        if not rows:
            continue
        lines.append("")
        lines.append(f"sweep over {key}: model ms per clip / FPS model / FPS end to end")
        for r in rows:
            lines.append(f"  {r['backend']:<22} T={r['T']:<3} {r['H']}x{r['W']:<5} {_fmt_ms(r['model_ms']):>9} ms "
                         f"{r['fps_model']:>7.2f} FPS {r['fps_end_to_end']:>7.2f} FPS e2e "
                         f"{r['gflops_per_s']:>7.1f} GFLOP/s")
    if report["ratios"]:
        lines.append("")
        lines.append("ratios (model-only clip throughput): " +
                     ", ".join(f"{k} {v:.2f}x" for k, v in report["ratios"].items()))
    if report.get("ratios_per_round"):
        lines.append("ratios per round (the clips of one round run back to back), median (min-max): " +
                     ", ".join(f"{k} {v['median']:.2f}x ({v['min']:.2f}-{v['max']:.2f})"
                               for k, v in report["ratios_per_round"].items()))
    for t in report["targets"]:
        verdict = 'met' if t['met'] else 'NOT met' if t['met'] is False else 'not measured'
        if not t.get("at_target_size", True):
            verdict = f"{verdict} here; the target is {t['note']}, this run is not that size"
        lines.append(f"target {t['name']} >= {t['target']}x: measured "
                     f"{'-' if t['measured'] is None else '%.2fx' % t['measured']} ({verdict})")
    return "\n".join(lines)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [b for b in report["backends"] if b["status"] == "ok"]
    parts = [p for p in report["parts"] if p not in ("model", "clip")]
    has_size = bool(report["sweeps"].get("size"))
    fig, axes = plt.subplots(1, 3 if has_size else 2, figsize=(17 if has_size else 13, 5.2))
    ax = axes[0]
    stage_parts = [p for p in parts if p.startswith("stage_")]
    warm = plt.get_cmap("YlOrRd")
    colours = {"preprocess": "#9e9e9e", "backbone": "#1f77b4", "fused_graph": "#9467bd", "backend": "#9467bd",
               "outputs_to_host": "#d0d0d0", "postprocess": "#2ca02c", "mask_head": "#8c564b"}
    for i, p in enumerate(stage_parts):
        colours[p] = warm(0.25 + 0.6 * i / max(1, len(stage_parts) - 1))
    left = np.zeros(len(ok))
    for part in parts:
        vals = np.array([b["latency_ms"].get(part, {}).get("mean", 0.0) for b in ok])
        if not vals.any():
            continue
        ax.barh(range(len(ok)), vals, left=left, color=colours.get(part, "#8c564b"), label=part,
                edgecolor="white", linewidth=0.5)
        left += vals
    ax.set_yticks(range(len(ok)), [b["name"] for b in ok])
    ax.invert_yaxis()
    s = report["settings"]
    ax.set_xlabel("ms per clip (mean)")
    ax.set_title(f"latency per part, T={s['clip']}, {s['size'][0]}x{s['size'][1]}")
    ax.legend(fontsize=7, loc="lower right")
    for y, b in enumerate(ok):
        ax.text(left[y], y, f" {b['fps']['end_to_end']:.2f} FPS e2e", va="center", fontsize=8)
    ax.set_xlim(0, left.max() * 1.35 if len(left) and left.max() > 0 else 1)

    def sweep_axis(ax, rows, key, label):
        for name in dict.fromkeys(r["backend"] for r in rows):
            pts = [r for r in rows if r["backend"] == name]
            xs = [r[key] if key == "T" else r["H"] * r["W"] / 1e3 for r in pts]
            line, = ax.plot(xs, [r["fps_model"] for r in pts], "o-", label=f"{name}")
            ax.plot(xs, [r["fps_end_to_end"] for r in pts], "x--", color=line.get_color(), alpha=0.6)
        ax.set_xlabel(label)
        ax.set_ylabel("frames per second (solid: model, dashed: end to end)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    rows = report["sweeps"].get("T") or [
        {"backend": b["name"], "T": s["clip"], "H": s["size"][0], "W": s["size"][1],
         "fps_model": b["fps"]["model"], "fps_end_to_end": b["fps"]["end_to_end"]} for b in ok]
    sweep_axis(axes[1], rows, "T", "clip length T")
    axes[1].set_xticks(sorted({r["T"] for r in rows}))
    axes[1].set_title(f"FPS vs T, {s['size'][0]}x{s['size'][1]}")
    if has_size:
        sweep_axis(axes[2], report["sweeps"]["size"], "size", "input kilo-pixels (H x W / 1000)")
        axes[2].set_title(f"FPS vs input size, T={s['clip']}")
    m = report["machine"]
    fig.suptitle(f"evis bench {report['created'][:10]}: {report['model']['description']}, "
                 f"{m['cpu_count']} CPUs, {s['threads']} threads, load {m['load_average']}", fontsize=10)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _make_specs(args, model, model_dir, manifest, threads):
    """[(name, runtime, precision, provider, make runner | None, skip reason)]."""
    import torch

    from efficientvis.export.parity import runtime_backends

    specs = [("pytorch", "pytorch", "fp32", "cpu (eager)", lambda: TorchRunner(model, "cpu"), "")]
    if args.channels_last:
        specs.append(("pytorch-channels-last", "pytorch", "fp32", "cpu (eager, channels_last)",
                      lambda: TorchRunner(model, "cpu", channels_last=True), ""))
    if torch.cuda.is_available():
        specs.append(("pytorch-cuda", "pytorch", "fp32", "cuda (eager)",
                      lambda: TorchRunner(copy.deepcopy(model), "cuda"), ""))
        specs.append(("pytorch-cuda-fp16", "pytorch", "fp16", "cuda (eager, autocast)",
                      lambda: TorchRunner(copy.deepcopy(model), "cuda", fp16=True), ""))
    for spec in runtime_backends(model_dir, args.qdq, args.engines, threads, manifest):
        if spec.skip:
            specs.append((spec.name, spec.runtime, spec.precision, spec.provider, None, spec.skip))
            continue
        if spec.runtime == "onnxruntime":
            specs.append((spec.name, spec.runtime, spec.precision, spec.provider,
                          lambda make=spec.make: OrtRunner(make()), ""))
        else:
            specs.append((spec.name, spec.runtime, spec.precision, spec.provider,
                          lambda make=spec.make: WholeRunner(make()), ""))
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    if wanted:
        names = [s[0] for s in specs]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise UserError(f"--backends: unknown {', '.join(unknown)} (known here: {', '.join(names)})")
        specs = [s for s in specs if s[0] in wanted]
    return specs


def _provider_label(runner, default):
    backend = getattr(runner, "backend", None)
    if backend is not None and hasattr(backend, "providers_in_use"):
        return ",".join(p.replace("ExecutionProvider", "") for p in backend.providers_in_use())
    return default


def run(args) -> int:
    import torch

    from efficientvis.export.flops import fused_flops, model_dir_flops, torch_flops
    from efficientvis.runtime import manifest as manifest_lib
    from efficientvis.training.infer import load_model

    started = time.perf_counter()
    threads = int(args.threads or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    if args.warmup < 0 or args.iters < 1:
        raise UserError("--warmup must be >= 0 and --iters >= 1")

    def log(message):
        print(message, file=sys.stderr, flush=True)

    ckpt, model_dir, description = prepare_model(args, log)
    manifest = manifest_lib.load(model_dir)
    model, cfg, _ = load_model(ckpt, "cpu")
    M = manifest.num_stages
    clip = args.clip or min(9, manifest.clip_length)
    stages = args.stages or M
    if not 1 <= clip <= manifest.clip_length:
        raise UserError(f"--clip must be 1..{manifest.clip_length} (the exported T), got {clip}; "
                        f"longer clips need a model exported with evis export --max-clip T")
    if not 1 <= stages <= M:
        raise UserError(f"--stages must be 1..{M}, got {stages}")
    if args.size:
        H, W = parse_size(args.size)
    else:
        H = manifest.test_size
        W = min(round(H * 16 / 9), manifest.max_size or 1 << 30)
    src_h, src_w = parse_size(args.source_size, "--source-size") if args.source_size else (2 * H, 2 * W)
    sweep_T = parse_ints(args.sweep_T, "--sweep-T") if args.sweep_T else []
    if any(t > manifest.clip_length for t in sweep_T):
        raise UserError(f"--sweep-T: values must be <= {manifest.clip_length} (the exported T)")
    sweep_sizes = [parse_size(s, "--sweep-size") for s in args.sweep_size.split(",") if s.strip()]
    sweep_iters = args.sweep_iters or args.iters
    max_T = max([clip] + sweep_T)

    log(f"evis bench: measuring the float32 matmul rate ({threads} threads) ...")
    machine = machine_info(threads)
    machine["matmul_gflops"] = matmul_gflops(threads)
    base_frames = source_clip(max_T, src_h, src_w)

    def clip_at(T, size_hw):
        h, w = size_hw
        sh, sw = (src_h, src_w) if (h, w) == (H, W) else (2 * h, 2 * w)
        frames = base_frames[:T]
        if frames[0].shape[:2] != (sh, sw):
            import cv2
            frames = [cv2.resize(f, (sw, sh), interpolation=cv2.INTER_LINEAR) for f in frames]
        return frames, min(h, w), max(h, w)

    clip_bgr, short, long_side = clip_at(clip, (H, W))
    from efficientvis.ytvis.clips import resized_shape
    in_h, in_w = resized_shape(src_h, src_w, short, long_side)

    flops_cache = {}

    def flops_at(T, h, w, fused=False):
        """FLOPs per clip of the split graphs (backbone + K stages: what PyTorch eager and the split
        backends compute) or of the fused model.onnx (earlier stages' heads pruned)."""
        key = (T, h, w, fused)
        if key not in flops_cache:
            flops_cache[key] = (fused_flops(model_dir, T, h, w, manifest) if fused else
                                model_dir_flops(model_dir, T, h, w, stages, manifest))
        return flops_cache[key]

    main_flops = flops_at(clip, in_h, in_w)
    specs = _make_specs(args, model, model_dir, manifest, threads)
    options = (manifest.infer_value("background_threshold", float, 0.2), manifest.infer_value("reset_after", int, 3))

    def _finish_entry(entry, runner, timer):
        """A measured backend's statistics, work and stage sweep; then its --sweep-T/--sweep-size
        points (each backend alone)."""
        records, input_hw, inst = timer.result()
        entry["input_size"] = list(input_hw)
        entry["latency_ms"] = {k: summarize(v) for k, v in records.items()}
        entry["model_ms_per_clip"] = [round(v * 1000, 3) for v in records["model"]]
        for k in records:
            if k not in all_parts:
                all_parts.append(k)
        model_ms, clip_ms = entry["latency_ms"]["model"]["mean"], entry["latency_ms"]["clip"]["mean"]
        entry["per_frame_ms"] = {"model": model_ms / clip, "clip": clip_ms / clip}
        entry["fps"] = {"model": 1000 * clip / model_ms, "end_to_end": 1000 * clip / clip_ms}
        fused = "fused_graph" in records
        work = flops_at(clip, in_h, in_w, fused)["total"]
        entry["gflops_per_clip"] = work / 1e9
        entry["gflops_per_s"] = work / 1e9 / (model_ms / 1000)
        entry["matmul_rate_share"] = entry["gflops_per_s"] / machine["matmul_gflops"]["value"]
        entry["instances_per_clip"] = inst
        lat = entry["latency_ms"]
        if "backbone" in lat and all(f"stage_{k}" in lat for k in range(stages)):
            cum, rows = lat["backbone"]["mean"] + lat.get("mask_head", {}).get("mean", 0.0), []
            for k in range(stages):
                cum += lat[f"stage_{k}"]["mean"]
                rows.append({"stages": k + 1, "model_ms": cum, "fps": 1000 * clip / cum})
            entry["stages_sweep"] = rows
        name = entry["name"]
        for T in sweep_T:
            frames_T, s_, l_ = clip_at(T, (H, W))
            rec, hw, _ = measure(runner, frames_T, s_, l_, stages, args.warmup, sweep_iters,
                                 manifest.num_queries, options)
            sweeps["T"].append(_sweep_row(name, T, hw, rec, flops_at(T, *hw, fused)))
        for size_hw in sweep_sizes:
            frames_s, s_, l_ = clip_at(clip, size_hw)
            rec, hw, _ = measure(runner, frames_s, s_, l_, stages, args.warmup, sweep_iters,
                                 manifest.num_queries, options)
            sweeps["size"].append(_sweep_row(name, clip, hw, rec, flops_at(clip, *hw, fused)))

    has_clear_refs = reset_peak_rss()
    round_robin = not args.sequential
    backends, sweeps, all_parts, loaded = [], {"T": [], "size": []}, [], []
    for name, runtime, precision, provider, make, skip in specs:
        entry = {"name": name, "runtime": runtime, "precision": precision, "provider": provider,
                 "threads": threads, "status": "skipped" if skip else "ok", "reason": skip}
        backends.append(entry)
        if skip:
            continue
        if name.endswith("-fused") and stages != M:
            entry["status"], entry["reason"] = "skipped", f"model.onnx always runs all {M} stages (--stages {stages})"
            continue
        log(f"evis bench: {name} ..." if not round_robin else f"evis bench: loading and warming up {name} ...")
        gc.collect()
        load_before = _load()
        rss0 = rss_mb()
        reset_peak_rss()
        try:
            runner = make()
            entry["provider"] = _provider_label(runner, provider)
            files = getattr(getattr(runner, "backend", None), "files", None)
            if files:  # which file each session runs (a QDQ_DIR's CPU form, the fused graph, ...)
                entry["graph_files"] = {g: os.path.basename(f) for g, f in files.items()}
            timer = ClipTimer(runner, clip_bgr, short, long_side, stages, args.warmup,
                              manifest.num_queries, options)
            for _ in range(args.warmup + (0 if round_robin else args.iters)):
                timer.step()
        except Exception as e:  # noqa: BLE001 - one failing backend (out of memory, ...) must not lose the others
            entry["status"], entry["reason"] = "error", one_line(e)
            continue
        # the process's peak while this backend loaded and ran (round robin: loaded and warmed up,
        # with the backends before it still loaded), and how far that is above the RSS before it
        peak = round(peak_rss_mb(), 1)
        entry["rss_increase_mb"] = round(peak - rss0, 1) if rss0 is not None else None
        if round_robin:
            entry["peak_rss_mb"] = None  # the process holds every backend: see process_peak_rss_mb
            loaded.append((entry, runner, timer))
            continue
        entry["peak_rss_mb"], entry["process_peak_rss_mb"] = peak, None
        entry["load_average"] = {"before": load_before, "after": _load()}
        _finish_entry(entry, runner, timer)
        del runner, timer
        gc.collect()
    if loaded:
        log(f"evis bench: {', '.join(e['name'] for e, _, _ in loaded)}, one clip each in turn "
            f"({args.iters} timed rounds) ...")
        load_before = _load()
        for _ in range(args.iters):
            for entry, _runner, timer in loaded:
                try:
                    timer.step()
                except Exception as e:  # noqa: BLE001 - as above
                    entry["status"], entry["reason"] = "error", one_line(e)
            loaded = [x for x in loaded if x[0]["status"] == "ok"]
        load_after, process_peak = _load(), round(peak_rss_mb(), 1)
        for entry, runner, timer in loaded:
            entry["process_peak_rss_mb"] = process_peak
            entry["load_average"] = {"before": load_before, "after": load_after}
            _finish_entry(entry, runner, timer)
        del loaded

    order = ["preprocess", "backbone"] + [f"stage_{k}" for k in range(M)] + \
        ["mask_head", "fused_graph", "backend", "outputs_to_host", "postprocess", "model", "clip"]
    parts = [p for p in order if p in all_parts] + [p for p in all_parts if p not in order]
    by_name = {b["name"]: b for b in backends if b["status"] == "ok"}
    ref = by_name.get("pytorch")
    for b in by_name.values():
        if ref is not None:
            b["speedup_vs_pytorch"] = {
                "model": ref["latency_ms"]["model"]["mean"] / b["latency_ms"]["model"]["mean"],
                "end_to_end": ref["latency_ms"]["clip"]["mean"] / b["latency_ms"]["clip"]["mean"]}
    ratios, ratios_per_round = {}, {}  # every backend against PyTorch eager; other ONNX Runtime ones also against ORT FP32
    for a, b in by_name.items():
        bases = ["pytorch"] + (["ort-fp32"] if b["runtime"] != "pytorch" else [])
        for base in bases:
            if a != base and base in by_name:
                ratios[f"{a} / {base}"] = (by_name[base]["latency_ms"]["model"]["mean"]
                                           / b["latency_ms"]["model"]["mean"])
                if round_robin:  # the two clips of one round ran a few seconds apart: paired
                    per_round = np.asarray(by_name[base]["model_ms_per_clip"]) / np.asarray(b["model_ms_per_clip"])
                    ratios_per_round[f"{a} / {base}"] = {
                        "median": float(np.median(per_round)), "min": float(per_round.min()),
                        "max": float(per_round.max()), "values": [round(float(v), 4) for v in per_round]}
    targets = []
    # the targets are stated for the paper-size model at 360x640, T = 9 (where the ratios mean
    # something); on a smaller model per-call overhead dominates and the ratio says little
    at_target_size = (cfg.model.backbone == "resnet50" and (in_h, in_w) == (360, 640) and clip == 9)
    for i, (a, base, target) in enumerate(TARGETS):
        measured = ratios.get(f"{a} / {base}")
        if i >= 2 and measured is None:
            continue
        targets.append({"name": f"{a} vs {base} (model-only clip throughput)", "target": target,
                        "measured": measured, "met": None if measured is None else bool(measured >= target),
                        "at_target_size": at_target_size,
                        "note": "stated for r50_ytvis19 at 360x640, T=9 on 2 CPU cores"})

    torch_count = None
    if ref is not None and not args.no_flop_counter:
        from efficientvis.runtime.preprocess import preprocess_frames
        torch_count = torch_flops(model, preprocess_frames(clip_bgr, short, long_side), stages)
    report = {
        "command": "bench", "format_version": FORMAT_VERSION, "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "model": {"description": description, "source": "random-weights" if args.random_weights else "checkpoint",
                  "checkpoint": ckpt, "config": cfg.name, "model_dir": model_dir, "qdq_dir": args.qdq,
                  "engine_dirs": list(args.engines), "roi_align": manifest.data.get("roi_align", "roialign"),
                  "backbone": cfg.model.backbone,
                  "N": manifest.num_queries, "C": manifest.hidden_dim, "M": M, "K": manifest.num_classes},
        "settings": {"size": [in_h, in_w], "source_size": [src_h, src_w], "clip": clip, "stages": stages,
                     "warmup": args.warmup, "iters": args.iters, "sweep_iters": sweep_iters,
                     "threads": threads, "order": "round-robin" if round_robin else "sequential",
                     "peak_rss": ("rss_increase_mb: peak over the RSS before, while each backend loaded and "
                                  "warmed up (all stay loaded: round robin); per-backend peaks with "
                                  "--sequential") if round_robin else
                     "VmHWM reset per backend" if has_clear_refs else "ru_maxrss (process-wide peak)"},
        "flops": {"method": main_flops["method"], "method_short": "analytic ONNX count",
                  "per_clip": main_flops["total"], "gflops_per_clip": main_flops["total"] / 1e9,
                  "gflops_per_frame": main_flops["total"] / 1e9 / clip,
                  "graphs": {g: v["flops"] for g, v in main_flops["graphs"].items()},
                  "unresolved_nodes": sum(len(v["unresolved"]) for v in main_flops["graphs"].values()),
                  "torch_flop_counter": torch_count,
                  "per_clip_fused": (flops_at(clip, in_h, in_w, True)["total"]
                                     if manifest.has("model") and stages == M else None)},
        "parts": parts,
        "backends": backends,
        "sweeps": sweeps,
        "ratios": ratios,
        "ratios_per_round": ratios_per_round,
        "targets": targets,
        "plot": None,
    }
    if args.plot:
        report["plot"] = plot(report, args.plot)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(format_table(report))
    if args.plot:
        print(f"plot: {args.plot}")
    if args.json:
        from efficientvis.export.parity import write_json
        write_json(args.json, report)
        print(f"json: {args.json}")
    return 0


def _sweep_row(name, T, hw, records, flops):
    model_ms = float(np.mean(records["model"])) * 1000
    clip_ms = float(np.mean(records["clip"])) * 1000
    return {"backend": name, "T": T, "H": hw[0], "W": hw[1], "model_ms": model_ms, "clip_ms": clip_ms,
            "fps_model": 1000 * T / model_ms, "fps_end_to_end": 1000 * T / clip_ms,
            "gflops_per_clip": flops["total"] / 1e9, "gflops_per_s": flops["total"] / 1e9 / (model_ms / 1000)}
