"""TensorRT backend of the clip loop (TensorRT 10.x / 11.x, tensor-name API, cuda-python).

ENGINE_DIR holds one serialised engine per graph of the ONNX interface (ARCHITECTURE.md):
`backbone.engine`, `stage_0.engine` .. `stage_{M-1}.engine`, `mask_0.engine` .. `mask_{M-1}.engine`
(stage k's mask head: only the last stage run computes masks), each with its metadata next to it
(`<name>.engine.json`), and the model's `manifest.json` (class names, T, N, C, preprocessing, and
`initial_queries.npy`) copied from MODEL_DIR. The engine metadata written by the engine builder:

    {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7",
     "precision": "fp16", "profiles": [{"frames": [[1,3,192,320], [6,3,192,320], [6,3,320,320]]}],
     "onnx_sha256": "..."}

Engines only run on the TensorRT version and the GPU they were built with: `check_engine_metadata`
(pure Python) refuses any other with a UserError naming both values, before anything is
deserialised. `tensorrt` and `cuda-python` are imported only when a TrtBackend is created.

Memory: every I/O tensor has one device buffer (cudaMalloc, grown when a larger shape comes);
the FPN features and the stage-to-stage queries/proposals never leave the device; the recurrent
queries live in two device buffers that swap roles every clip (stage_0 reads one, the last stage
run writes `next_queries` into the other). The frames and stage_0's small clip-start inputs
(image_size, carried, carried_boxes) go up, and only the last stage's class
logits, boxes and mask probabilities come back, through pinned host buffers (cudaMallocHost,
grown like the device ones), so every copy is queued on the one CUDA stream without the host
waiting for it: the host waits once per clip, for the results.
"""

import ctypes
import json
import os

import numpy as np

from efficientvis.errors import UserError
from efficientvis.runtime.carry import clip_start_inputs

ENGINE_SUFFIX = ".engine"
METADATA_SUFFIX = ".engine.json"
REQUIRED_METADATA = ("tensorrt_version", "gpu_name", "compute_capability")


# ----------------------------------------------------------------------------------------------
# engine metadata (pure Python: tested everywhere)

def is_engine_dir(path) -> bool:
    """An ENGINE_DIR is recognised by the engine metadata files in it."""
    return os.path.isdir(path) and any(n.endswith(METADATA_SUFFIX) for n in os.listdir(path))


def read_engine_metadata(engine_path) -> dict:
    meta_path = engine_path + ".json"
    if not os.path.isfile(meta_path):
        raise UserError(f"{engine_path}: engine metadata {os.path.basename(meta_path)} is missing; "
                        f"rebuild the engine with `evis build` (it records TensorRT version and GPU)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path}: not valid JSON ({e})") from None
    missing = [k for k in REQUIRED_METADATA if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{meta_path}: engine metadata lacks {', '.join(missing)}")
    return meta


def _version_key(version) -> tuple:
    """'10.3.0.26' -> (10, 3, 0): engines are tied to major.minor.patch."""
    parts = []
    for p in str(version).split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def _capability(value) -> str:
    if isinstance(value, (list, tuple)):
        return ".".join(str(int(v)) for v in value)
    return str(value).strip()


def check_engine_metadata(meta, tensorrt_version, gpu_name, compute_capability, where="engine"):
    """Refuse an engine built with another TensorRT version or on another GPU (UserError naming
    both values). `meta` is the dict of `<name>.engine.json`."""
    built, here = str(meta["tensorrt_version"]), str(tensorrt_version)
    if _version_key(built) != _version_key(here):
        raise UserError(f"{where} was built with TensorRT {built}, this machine has TensorRT {here}: "
                        f"engines only load on the TensorRT version that built them; rebuild it here "
                        f"with `evis build`")
    built_cc, here_cc = _capability(meta["compute_capability"]), _capability(compute_capability)
    built_gpu, here_gpu = str(meta["gpu_name"]).strip(), str(gpu_name).strip()
    if built_cc != here_cc or built_gpu != here_gpu:
        raise UserError(f"{where} was built on {built_gpu} (compute capability {built_cc}), this GPU is "
                        f"{here_gpu} (compute capability {here_cc}): engines are tied to the GPU; "
                        f"rebuild it on this machine with `evis build`")
    return True


# ----------------------------------------------------------------------------------------------
# CUDA helpers (cuda-python)

def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise UserError("the TensorRT backend needs cuda-python (pip install 'cuda-python>=12', "
                            "its major version matching CUDA: 12 on JetPack 6, 13 on JetPack 7)") from None
    return cudart


class _Cuda:
    def __init__(self, cudart):
        self.rt = cudart

    def call(self, result, what):
        """cuda-python returns (error, *values): raise on an error, return the value(s)."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            try:
                _, name = self.rt.cudaGetErrorString(err)
                name = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:  # noqa: BLE001 - the error itself is what matters
                name = str(err)
            raise RuntimeError(f"CUDA error in {what}: {name}")
        return values[0] if len(values) == 1 else (tuple(values) if values else None)

    def device_info(self):
        device = self.call(self.rt.cudaGetDevice(), "cudaGetDevice")
        prop = self.call(self.rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"

    def malloc(self, nbytes):
        return int(self.call(self.rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))

    def free(self, ptr):
        self.call(self.rt.cudaFree(ptr), "cudaFree")

    def htod(self, dst, array, stream):
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call(self.rt.cudaMemcpyAsync(dst, array.ctypes.data, array.nbytes, kind, stream), "cudaMemcpyAsync H2D")

    def dtoh(self, array, src, stream):
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call(self.rt.cudaMemcpyAsync(array.ctypes.data, src, array.nbytes, kind, stream), "cudaMemcpyAsync D2H")

    def malloc_host(self, nbytes):
        return int(self.call(self.rt.cudaMallocHost(max(int(nbytes), 1)), "cudaMallocHost"))

    def free_host(self, ptr):
        self.call(self.rt.cudaFreeHost(ptr), "cudaFreeHost")

    def sync(self, stream):
        self.call(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


class _Buffer:
    """A device (or, pinned=True, page-locked host) allocation that grows to the largest size
    asked for."""

    def __init__(self, cuda, pinned=False):
        self.cuda, self.pinned, self.ptr, self.nbytes = cuda, pinned, 0, 0

    def ensure(self, nbytes):
        if nbytes > self.nbytes:
            self.free()
            alloc = self.cuda.malloc_host if self.pinned else self.cuda.malloc
            self.ptr, self.nbytes = alloc(nbytes), int(nbytes)
        return self.ptr

    def array(self, shape, dtype):
        """A numpy view of a pinned buffer (valid until the buffer grows or is freed)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        raw = (ctypes.c_byte * max(count * dtype.itemsize, 1)).from_address(self.ensure(count * dtype.itemsize))
        return np.frombuffer(raw, dtype, count).reshape(shape)

    def free(self):
        if self.ptr:
            (self.cuda.free_host if self.pinned else self.cuda.free)(self.ptr)
            self.ptr, self.nbytes = 0, 0


class _Engine:
    """One deserialised engine + execution context, addressed by tensor name."""

    def __init__(self, trt, runtime, path):
        with open(path, "rb") as f:
            self.engine = runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise UserError(f"{path}: TensorRT could not deserialise the engine (see the log above)")
        self.context = self.engine.create_execution_context()
        if self.context is None:  # out of device memory for its activations (Orin Nano)
            raise UserError(f"{path}: TensorRT could not create an execution context (out of GPU "
                            f"memory? see the log above)")
        self.path = path
        self.inputs, self.outputs, self.dtypes = [], [], {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = self.engine.get_tensor_mode(name)
            (self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs).append(name)
            self.dtypes[name] = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))

    def set_shapes(self, shapes):
        """Input shapes of this run (name -> shape); then output_shape() is valid."""
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, tuple(int(s) for s in shape)):
                raise UserError(f"{self.path}: input {name} of shape {tuple(shape)} is outside the "
                                f"engine's optimisation profile (rebuild with a wider profile)")

    def output_shape(self, name):
        return tuple(self.context.get_tensor_shape(name))

    def nbytes(self, name):
        return int(np.prod(self.output_shape(name))) * self.dtypes[name].itemsize

    def execute(self, addresses, stream):
        """addresses: every I/O tensor name -> device pointer."""
        for name in self.inputs + self.outputs:
            self.context.set_tensor_address(name, int(addresses[name]))
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"{self.path}: execute_async_v3 failed (see the TensorRT log)")


# ----------------------------------------------------------------------------------------------

class TrtBackend:
    """The clip-loop backend interface on TensorRT engines (see runtime/clip_loop.py)."""

    def __init__(self, engine_dir, manifest=None, verbose=False):
        from efficientvis.runtime import manifest as manifest_lib

        if not os.path.isdir(engine_dir):
            raise UserError(f"engine folder not found: {engine_dir}")
        self.engine_dir = engine_dir
        self.manifest = manifest or manifest_lib.load(engine_dir, verify=False)
        m = self.manifest
        self.num_queries, self.clip_length = m.num_queries, m.clip_length
        self.num_stages = m.num_stages
        names = m.split_graphs
        paths = [os.path.join(engine_dir, n + ENGINE_SUFFIX) for n in names]
        for p in paths:
            if not os.path.isfile(p):
                raise UserError(f"engine not found: {p}")
        metas = [read_engine_metadata(p) for p in paths]

        try:
            import tensorrt as trt
        except ImportError:
            raise UserError("the TensorRT backend needs the tensorrt Python package (JetPack ships it; "
                            "on x86 install TensorRT 10/11 from NVIDIA), or use --backend ort") from None
        cudart = _import_cudart()
        self.cuda = _Cuda(cudart)
        gpu_name, capability = self.cuda.device_info()
        for p, meta in zip(paths, metas):  # before anything is deserialised
            check_engine_metadata(meta, trt.__version__, gpu_name, capability, where=p)
        self.precision = metas[0].get("precision", "?")

        self.logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self.logger, "")  # ROIAlign_TRT and friends, before deserialising
        self.runtime = trt.Runtime(self.logger)
        self.engines = {n: _Engine(trt, self.runtime, p) for n, p in zip(names, paths)}
        self.stream = self.cuda.call(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.buffers, self.host_buffers = {}, {}
        # the recurrent queries: stage 0 reads them in its input type, every last stage writes them
        q_dtype = self.engines["stage_0"].dtypes["init_queries"]
        for k in range(self.num_stages):
            if self.engines[f"stage_{k}"].dtypes["next_queries"] != q_dtype:
                raise UserError(f"{engine_dir}: stage_{k} writes next_queries as "
                                f"{self.engines[f'stage_{k}'].dtypes['next_queries']} but stage_0 reads "
                                f"init_queries as {q_dtype} (build the engines again with `evis build`)")
        self.q_star = m.initial_queries.astype(q_dtype)
        self.query_buffers = [_Buffer(self.cuda), _Buffer(self.cuda)]
        for b in self.query_buffers:
            b.ensure(self.q_star.nbytes)
        self.current = None  # index of the query buffer the next clip reads; None before start_video

    def providers_in_use(self):
        return [f"TensorRT {self.precision}"]

    def _buffer(self, key, nbytes):
        if key not in self.buffers:
            self.buffers[key] = _Buffer(self.cuda)
        return self.buffers[key].ensure(nbytes)

    def _host_array(self, key, shape, dtype):
        if key not in self.host_buffers:
            self.host_buffers[key] = _Buffer(self.cuda, pinned=True)
        return self.host_buffers[key].array(shape, dtype)

    def start_video(self):
        self.current = 0
        self.cuda.htod(self.query_buffers[0].ptr, np.ascontiguousarray(self.q_star), self.stream)

    def _reset(self, reset):
        queries = np.empty_like(self.q_star)
        ptr = self.query_buffers[self.current].ptr
        self.cuda.dtoh(queries, ptr, self.stream)
        self.cuda.sync(self.stream)
        queries[reset] = self.q_star[reset]
        self.cuda.htod(ptr, queries, self.stream)

    def run_clip(self, frames, reset, num_iterations=None, carried=None):
        stages = int(num_iterations or self.num_stages)
        if not 1 <= stages <= self.num_stages:
            raise UserError(f"--stages must be 1..{self.num_stages}, got {stages}")
        if self.current is None:  # the recurrent queries hold nothing yet
            self.start_video()
        if reset is not None and np.any(reset):
            self._reset(np.asarray(reset, bool))
        backbone, stage_0 = self.engines["backbone"], self.engines["stage_0"]
        # in the engines' own input types (float32 for `evis build`'s engines, which keep float
        # inputs; a graph converted with float16 inputs gets float16 bytes, not float32 ones)
        frames = np.asarray(frames)
        T, _, H, W = frames.shape
        # staged in pinned memory, so the uploads are queued without the host waiting for them
        host_frames = self._host_array("frames", frames.shape, backbone.dtypes["frames"])
        host_frames[...] = frames
        start = clip_start_inputs((H, W), carried, self.num_queries)
        addresses = {"frames": self._buffer("frames", host_frames.nbytes)}
        self.cuda.htod(addresses["frames"], host_frames, self.stream)
        shapes = {}
        for name, value in start.items():  # stage_0's small clip-start inputs
            host = self._host_array(name, value.shape, stage_0.dtypes[name])
            host[...] = value
            addresses[name], shapes[name] = self._buffer(name, host.nbytes), value.shape
            self.cuda.htod(addresses[name], host, self.stream)
        backbone.set_shapes({"frames": frames.shape})
        shapes.update({n: backbone.output_shape(n) for n in backbone.outputs})  # p2..p5
        for name in backbone.outputs:
            addresses[name] = self._buffer(name, backbone.nbytes(name))
        backbone.execute(addresses, self.stream)

        addresses["init_queries"] = self.query_buffers[self.current].ptr
        shapes["init_queries"] = self.q_star.shape
        for k in range(stages):
            engine = self.engines[f"stage_{k}"]
            engine.set_shapes({n: shapes[n] for n in engine.inputs})
            for name in engine.outputs:
                if name == "next_queries" and k == stages - 1:  # the other recurrent buffer
                    addresses[name] = self.query_buffers[1 - self.current].ptr
                else:  # consecutive stages alternate between two sets of output buffers
                    addresses[name] = self._buffer((k % 2, name), engine.nbytes(name))
                shapes[name] = engine.output_shape(name)
            engine.execute(addresses, self.stream)
            # this stage's outputs are the next stage's inputs
            addresses["queries_in"], shapes["queries_in"] = addresses["queries"], shapes["queries"]
            addresses["proposals_in"], shapes["proposals_in"] = addresses["proposals"], shapes["proposals"]
        mask_head = self.engines[f"mask_{stages - 1}"]  # reads the last stage's attended and proposals
        mask_head.set_shapes({n: shapes[n] for n in mask_head.inputs})
        shapes["mask_probs"] = mask_head.output_shape("mask_probs")
        addresses["mask_probs"] = self._buffer("mask_probs", mask_head.nbytes("mask_probs"))
        mask_head.execute(addresses, self.stream)
        dtypes = {**engine.dtypes, **mask_head.dtypes}
        result = {}
        for key, name in (("class_logits", "class_logits"), ("boxes", "proposals"), ("mask_probs", "mask_probs")):
            result[key] = self._host_array(name, shapes[name], dtypes[name])
            self.cuda.dtoh(result[key], addresses[name], self.stream)
        self.cuda.sync(self.stream)
        self.current = 1 - self.current
        # copies: the pinned buffers are overwritten by the next clip
        return {k: v.astype(np.float32, copy=True) for k, v in result.items()}

    def close(self):
        for b in list(self.buffers.values()) + list(self.host_buffers.values()) + self.query_buffers:
            b.free()
        self.buffers, self.host_buffers = {}, {}
        if getattr(self, "stream", None) is not None:
            self.cuda.call(self.cuda.rt.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None
