"""ONNX Runtime backend of the clip loop, over the exported graphs of MODEL_DIR.

MODEL_DIR (written by `evis export`, interface in ARCHITECTURE.md): `backbone.onnx`,
`stage_0.onnx` .. `stage_{M-1}.onnx`, `mask_0.onnx` .. `mask_{M-1}.onnx` and/or the fused
`model.onnx`, `initial_queries.npy` (q*) and `manifest.json`. `manifest.load` reads the manifest and checks every file it lists against its
sha256 (a changed or truncated file is a UserError naming it), torch-free.

`OrtBackend` creates its sessions once. Per clip: backbone -> stage_0 (init_queries = the recurrent
queries, image_size, carried/carried_boxes from the clip loop) -> stage_1 .. stage_{K-1} (queries/proposals of the previous stage) ->
mask_{K-1} (stage K-1's attended queries and proposals: only the last stage's masks are computed)
-> the class logits, boxes and mask probabilities of stage K-1; its `next_queries` start the next clip.
K = all M stages, or fewer (anytime inference: every stage outputs next_queries). The fused
`model.onnx` (one call per clip, always all M stages) is used when it is the only graph there or
when asked for (`fused=True`).

Providers: "cpu"; "cuda" (CUDAExecutionProvider, device_id); "tensorrt" (TensorRT execution
provider with FP16/INT8, engine and timing caches under `cache_dir` and optimisation profiles
built from the manifest's dynamic axes, then CUDA, then CPU for what TensorRT does not take).
`providers_in_use()` is what the sessions really run on (`session.get_providers()`); a requested
GPU provider that fell back to CPU is reported on stderr once.

On a GPU provider the backend uses IO binding: the frames are copied to the device once, the FPN
features and the stage-to-stage queries and proposals stay on the device as OrtValues, and the
recurrent queries (last stage's `next_queries`) stay there between clips; only the last stage's
class logits, boxes and mask probabilities come back to the host. A slot reset (rare) round-trips the
queries through the host and puts q* into the reset slots. On CPU plain `run()` is used.

INT8: `qdq_dir` holds Q/DQ versions of the graphs (same file names, from `evis calibrate`); they run
on every provider (TensorRT EP with trt_int8_enable, except for the graphs the calibration left
FP32: the manifest's quantization.op_types lists none for them). On the CPU provider a graph's
`cpu_form` (`<graph>.cpu.onnx`: uint8 activations) is run instead when the QDQ_DIR has one.
FP16 is a TensorRT EP option.
"""

import hashlib
import os
import sys
import time

import numpy as np

from efficientvis.errors import UserError, one_line
from efficientvis.runtime import manifest as manifest_lib
from efficientvis.runtime.carry import clip_start_inputs

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
FEATURES = ("p2", "p3", "p4", "p5")
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
STAGE_OUTPUTS = ("queries", "proposals", "class_logits", "attended", "next_queries")
MASK_OUTPUTS = ("mask_probs",)
FUSED_OUTPUTS = ("class_logits", "proposals", "mask_probs", "next_queries")


# ----------------------------------------------------------------------------------------------

def _warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _profile_string(shapes):
    return ",".join(f"{name}:{'x'.join(str(int(d)) for d in shape)}" for name, shape in shapes.items())


def axis_values(T, H, W):
    """Values of the manifest's named axes for clips of T frames of H x W (model input)."""
    axes = {"T": int(T), "H": int(H), "W": int(W)}
    for stride in STRIDES.values():
        axes[f"H{stride}"], axes[f"W{stride}"] = -(-int(H) // stride), -(-int(W) // stride)
    return axes


def dynamic_input_shapes(graph_entry, T, H, W):
    """{input name: shape} of a graph's inputs that have named (dynamic) axes."""
    axes = axis_values(T, H, W)
    shapes = {}
    for tensor in graph_entry.get("inputs", []):
        shape = tensor["shape"]
        if all(isinstance(d, int) for d in shape):
            continue
        try:
            shapes[tensor["name"]] = tuple(axes[d] if isinstance(d, str) else int(d) for d in shape)
        except KeyError as e:
            raise UserError(f"manifest: input {tensor['name']} has an unknown axis {e}") from None
    return shapes


def inference_session(ort, path, options, providers, entry=None):
    """An ONNX Runtime session of one graph, without the optimizers its manifest entry names: a
    Q/DQ backbone with a Q/DQ pair per consumer loses its int8 convs to the common-subexpression
    elimination (calibration/quantize.py; r50 backbone at 360x640, T = 9: 2.7 s with it, 1.3 s
    without)."""
    return ort.InferenceSession(path, options, providers=providers,
                                disabled_optimizers=list((entry or {}).get("onnxruntime_disabled_optimizers", [])))


def check_interface(session, entry, path, num_queries, num_classes):
    """The graph has the tensors the manifest names, with its static sizes, and N x K class logits:
    an edited or mismatched manifest is one line here, not wrong class names or a shape error
    in the middle of a run."""
    actual = {t.name: t.shape for t in session.get_inputs() + session.get_outputs()}
    for t in (entry.get("inputs") or []) + (entry.get("outputs") or []):
        shape = actual.get(t["name"])
        if shape is None:
            raise UserError(f"{path}: the manifest names a tensor {t['name']!r} that the graph does not "
                            f"have (the graph's: {', '.join(actual)})")
        declared = t.get("shape") or []
        if len(declared) != len(shape) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                              for a, b in zip(declared, shape)):
            raise UserError(f"{path}: tensor {t['name']} is {shape} in the graph, {declared} in the manifest")
    logits = actual.get("class_logits")
    if logits and (logits[0], logits[-1]) != (num_queries, num_classes) and all(
            isinstance(d, int) for d in (logits[0], logits[-1])):
        raise UserError(f"{path}: class_logits is {logits} but the manifest says N = {num_queries} "
                        f"queries and K = {num_classes} classes")


def content_key(entry, path):
    """A short key of a graph's content: the manifest's sha256 of its file and external data (the
    file's own hash when the manifest has none)."""
    digest = hashlib.sha256((entry.get("sha256") or manifest_lib.sha256_of(path)).encode())
    for extra in entry.get("external_data") or []:
        digest.update(str(extra.get("sha256")).encode())
    return digest.hexdigest()[:16]


class OrtBackend:
    """The clip-loop backend interface (runtime/clip_loop.py) on ONNX Runtime sessions."""

    def __init__(self, model_dir, provider="cpu", fp16=False, int8=False, threads=0, cache_dir=None,
                 profile_shapes=None, qdq_dir=None, fused=False, device_id=0, manifest=None,
                 every_mask_head=False, tensorrt_form=False):
        import onnxruntime as ort

        self.ort = ort
        if provider not in PROVIDERS:
            raise UserError(f"--provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
        if fp16 and provider != "tensorrt":
            raise UserError("--fp16 needs --provider tensorrt (ONNX Runtime's CPU and CUDA providers run "
                            "the FP32 graphs as they are)")
        self.manifest = m = manifest or manifest_lib.load(model_dir)
        self.model_dir, self.provider, self.device_id = model_dir, provider, int(device_id)
        self.num_queries, self.clip_length = m.num_queries, m.clip_length
        self.num_stages = m.num_stages
        self.every_mask_head = every_mask_head  # calibration: every stage's mask head sees its inputs
        # tensorrt_form: a QDQ_DIR's TensorRT form (symmetric int8) on the CPU provider too (its
        # accuracy, measured where TensorRT is not)
        graph_dir, graphs_of = model_dir, m
        if "quantization" in m.data:  # a QDQ_DIR given as the model itself
            qdq_dir = qdq_dir or model_dir
        if int8 or qdq_dir:
            if not qdq_dir:
                raise UserError("INT8 needs the Q/DQ graphs written by `evis calibrate` (--qdq DIR)")
            if not os.path.isdir(qdq_dir):
                raise UserError(f"Q/DQ folder not found: {qdq_dir}")
            if os.path.isfile(os.path.join(qdq_dir, "manifest.json")):
                graphs_of = manifest_lib.load(qdq_dir)
            graph_dir, int8 = qdq_dir, True

        # graphs `evis calibrate` left FP32 in a QDQ_DIR (the stages by default): no INT8 for them
        self.float_graphs = {g for g, t in graphs_of.data.get("quantization", {}).get("op_types", {}).items()
                             if t == []}

        available = set(ort.get_available_providers())
        # a GPU provider this ONNX Runtime lacks runs on CPU (warned below)
        on_cpu = provider == "cpu" or PROVIDERS[provider] not in available

        def entry_of(g):
            """A graph's manifest entry; on the CPU provider a Q/DQ graph's CPU form if it has one
            (uint8 activations: ONNX Runtime's x86 int8 kernels, no float Relu between Q/DQ)."""
            entry = graphs_of.graphs.get(g) or {"file": g + ".onnx"}
            if on_cpu and int8 and "cpu_form" in entry and not tensorrt_form:
                return entry["cpu_form"]
            return entry

        def file_of(g):
            return os.path.join(graph_dir, entry_of(g)["file"])

        split = m.split_graphs
        self.fused = bool(fused) or not all(os.path.isfile(file_of(g)) for g in split)
        if self.fused and not os.path.isfile(file_of("model")):
            raise UserError(f"{graph_dir}: " + ("no model.onnx (export with --fused)" if fused else
                                               "neither the split graphs (backbone, stage_k, mask_k .onnx) "
                                               "nor model.onnx"))
        graphs = ["model"] if self.fused else split
        self.files = files = {g: file_of(g) for g in graphs}  # what each session runs
        self.precision = "int8" if int8 else "fp16" if fp16 else "fp32"

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # each session has its own intra-op pool, whose threads spin after a run by default: the
        # backbone's and each stage's spinning threads then steal the cores the next graph runs on
        # (2 cores: an r50 stage 80-125 ms with spinning, 53-75 ms without; a tiny-model clip
        # 169-191 ms with, 59-64 ms without), and the fused graph's the cores of the caller's
        # pre- and post-processing
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {}
        for g in graphs:
            # providers this ONNX Runtime lacks are left out (reported below, without ORT's own
            # warnings); one that is there but fails to load falls back to CPU inside ORT
            content = content_key(entry_of(g), files[g]) if provider == "tensorrt" else None
            providers = [p for p in self._providers(g, fp16, int8, cache_dir, profile_shapes, content)
                         if (p[0] if isinstance(p, tuple) else p) in available]
            try:
                self.sessions[g] = inference_session(ort, files[g], options, providers, entry_of(g))
            except Exception as e:  # noqa: BLE001 - ORT raises its own exception classes
                raise UserError(f"{files[g]}: ONNX Runtime cannot load it ({one_line(e, 200)})") from None
            check_interface(self.sessions[g], m.graphs.get(g, {}), files[g], m.num_queries, m.num_classes)
        self.in_use = self.providers_in_use()
        # IO binding keeps tensors on this device between stages and clips ("cuda" for both GPU
        # providers; tests run the same path with "cpu")
        self.on_device = self.in_use[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.device_type = "cuda"
        requested = PROVIDERS[provider]
        if provider != "cpu" and requested not in self.in_use:
            if requested in available:  # there, but it failed to start: ORT fell back on its own
                problem = (f"{requested} is in this ONNX Runtime ({ort.__version__}) but failed to start, "
                           f"and ONNX Runtime fell back to {', '.join(self.in_use)}")
                if fp16:  # the FP16 a user asked for would silently be FP32
                    raise UserError(f"{problem}: --fp16 needs it (ONNX Runtime's TensorRT provider is "
                                    f"built for TensorRT 10; check its libraries, or build engines with "
                                    f"`evis build` and run them with --backend trt)")
                _warn(f"{problem} (ONNX Runtime logs the provider's error before it falls back)")
            else:
                _warn(f"{requested} was requested but is not available in this ONNX Runtime "
                      f"({ort.__version__}, device {ort.get_device()}); running on {', '.join(self.in_use)}. "
                      f"Install onnxruntime-gpu (and not onnxruntime) matching your CUDA, and check "
                      f"the CUDA/cuDNN/TensorRT libraries are found")
        self.q_star = m.initial_queries
        self.queries = None
        self.inputs = {g: {i.name for i in s.get_inputs()} for g, s in self.sessions.items()}

    # -- providers -------------------------------------------------------------------------------
    def _providers(self, graph, fp16, int8, cache_dir, profile_shapes, content):
        # HEURISTIC: the default (EXHAUSTIVE) benchmarks every cuDNN algorithm again for each new
        # input shape, i.e. each video size and each video's shorter last clip: latency spikes
        cuda = ("CUDAExecutionProvider", {"device_id": self.device_id, "cudnn_conv_algo_search": "HEURISTIC"})
        if self.provider == "cpu":
            return ["CPUExecutionProvider"]
        if self.provider == "cuda":
            return [cuda, "CPUExecutionProvider"]
        cache = cache_dir or os.path.join(self.model_dir, "trt_cache")
        try:
            os.makedirs(cache, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the TensorRT cache folder {cache}: {e.strerror or e} "
                            f"(give a writable one with --cache)") from None
        # ONNX Runtime names a cached engine by the graph's file name, node names and versions, not
        # its weights: a re-export or a recalibration into the same folder (or two checkpoints
        # sharing --cache) would load the old engine. One engine folder per graph content.
        engines = os.path.join(cache, content)
        trt = {"device_id": self.device_id, "trt_fp16_enable": bool(fp16),
               "trt_int8_enable": bool(int8) and graph not in self.float_graphs,
               "trt_engine_cache_enable": True, "trt_engine_cache_path": engines,
               "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}
        profiles = self.profiles(graph, profile_shapes)
        for key in ("min", "opt", "max"):
            trt[f"trt_profile_{key}_shapes"] = _profile_string(profiles[key])
        return [("TensorrtExecutionProvider", trt), cuda, "CPUExecutionProvider"]

    def profiles(self, graph, profile_shapes=None):
        """TensorRT optimisation profiles of a graph's dynamic inputs. `profile_shapes`:
        {"min"|"opt"|"max": (T, H, W)} frame shapes (e.g. from the source's size); default the
        manifest's dynamic_axes ranges."""
        m = self.manifest
        if profile_shapes is None:
            axes = m.dynamic_axes
            try:
                profile_shapes = {k: (axes["T"][k], axes["H"][k], axes["W"][k]) for k in ("min", "opt", "max")}
            except (KeyError, TypeError):
                raise UserError(f"{m.model_dir}/manifest.json: no dynamic_axes T/H/W min/opt/max for "
                                f"the TensorRT profiles (export again)") from None
        entry = m.graphs[graph]
        return {key: dynamic_input_shapes(entry, *profile_shapes[key]) for key in ("min", "opt", "max")}

    def providers_in_use(self):
        seen = []
        for s in self.sessions.values():
            for p in s.get_providers():
                if p not in seen:
                    seen.append(p)
        return seen

    # -- the backend interface ---------------------------------------------------------------------
    def start_video(self):
        self.queries = self._to_device(self.q_star) if self.on_device else self.q_star.copy()

    def _to_device(self, array):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, self.device_id)

    def _reset(self, reset):
        queries = self.queries.numpy() if self.on_device else self.queries
        queries = np.array(queries, np.float32, copy=True)
        queries[reset] = self.q_star[reset]
        self.queries = self._to_device(queries) if self.on_device else queries

    def run_clip(self, frames, reset, num_iterations=None, carried=None, times=None):
        """One clip (see _forward; `times`: evis bench's seconds per part)."""
        stages = int(num_iterations or self.num_stages)
        if not 1 <= stages <= self.num_stages:
            raise UserError(f"the model has {self.num_stages} stages; cannot run {stages}")
        if self.fused and stages != self.num_stages:
            raise UserError("anytime inference (fewer stages) needs the split graphs "
                            "(backbone.onnx, stage_k.onnx, mask_k.onnx), not model.onnx")
        if self.queries is None:
            self.start_video()
        if reset is not None and np.any(reset):
            self._reset(np.asarray(reset, bool))
        frames = np.ascontiguousarray(frames, np.uint8)
        start = {"init_queries": self.queries, **clip_start_inputs(frames.shape[-2:], carried, self.num_queries)}
        try:
            return self._forward(frames, start, stages, times)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - ORT's InvalidArgument / Fail / RuntimeException
            if type(e).__module__.startswith("onnxruntime"):
                raise UserError(f"ONNX Runtime rejected the clip of shape {frames.shape} "
                                f"({one_line(e, 200)})") from None
            raise

    def _call(self, graph, feeds, outputs):
        """One session run. On a GPU provider through IO binding: inputs that are OrtValues stay
        where they are, numpy inputs are copied in, outputs stay on the device as OrtValues."""
        session = self.sessions[graph]
        feeds = {n: v for n, v in feeds.items() if n in self.inputs[graph]}
        if not self.on_device:
            return dict(zip(outputs, session.run(list(outputs), feeds)))
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in outputs:
            binding.bind_output(name, self.device_type, self.device_id)
        session.run_with_iobinding(binding)
        return dict(zip(outputs, binding.get_outputs()))

    def _forward(self, frames, start, stages, times=None):
        """One clip through the graphs; `start`: stage_0's clip-start inputs. `times` (a dict, for
        `evis bench`): seconds per part are recorded into it (backbone, stage_k, mask_head or
        fused_graph, outputs_to_host)."""
        last = [time.perf_counter()]

        def lap(part):
            if times is not None:
                now = time.perf_counter()
                times[part], last[0] = now - last[0], now

        frames = self._to_device(frames) if self.on_device else frames
        if self.fused:
            out = self._call("model", {"frames": frames, **start}, FUSED_OUTPUTS)
            lap("fused_graph")
        else:
            features = self._call("backbone", {"frames": frames}, FEATURES)
            lap("backbone")
            for k in range(stages):
                feeds = dict(features, **(start if k == 0 else
                                          {"queries_in": out["queries"], "proposals_in": out["proposals"]}))
                out = self._call(f"stage_{k}", feeds, STAGE_OUTPUTS)
                lap(f"stage_{k}")
                if self.every_mask_head or k == stages - 1:
                    out.update(self._call(f"mask_{k}", dict(features, attended=out["attended"],
                                                            proposals=out["proposals"]), MASK_OUTPUTS))
                    lap("mask_head")
        self.queries = out["next_queries"]  # an OrtValue on the device with IO binding
        host = {"class_logits": out["class_logits"], "boxes": out["proposals"], "mask_probs": out["mask_probs"]}
        host = {k: v.numpy() if self.on_device else v for k, v in host.items()}
        lap("outputs_to_host")
        return host
