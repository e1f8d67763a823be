"""manifest.json of an exported MODEL_DIR: what the runtime and the TensorRT builder read.

json + hashlib + numpy only (no torch, no onnx): it lives in the runtime, and `evis export`
(upstream) writes it with the same module.

`evis export` writes the manifest last and atomically (`write`), so a folder with a manifest is a
complete export; `load(model_dir)` reads it back and checks the sha256 of every file it lists
(graphs, their external-data files, q*), raising a UserError that names a missing or changed file.

Schema (FORMAT = "efficientvis-onnx", FORMAT_VERSION = 4; keys in ARCHITECTURE.md; version 1 graphs
output mask logits instead of mask_probs, version 2 stage graphs include their mask heads, version 3
stage_0 has no carried/carried_boxes inputs):

    format, format_version, package_version, created (UTC, ISO 8601)
    opset, roi_align ("roialign" | "gridsample"), exporter {torch, onnx}
    T (max clip length), N, C, M (stages), K (classes), mask_size
    class_names [K], category_ids [K]
    preprocessing {dtype, layout, colour, value_range, normalisation {where, mean, std},
                   resize, test_size, max_size, interpolation}
    infer {top_k, reset_after, background_threshold, linking, num_iterations, duplicate_iou, ...}
    carry_threshold                                     null, or the model.carry_threshold of a model
                                                        trained with model.carry_proposals
    dynamic_axes {axis: {min, opt, max[, expr]}}       T, H, W and the feature-map axes
                                                        H4 = ceil(H/4) ... W32 = ceil(W/32)
    stages ["stage_0", ...], mask_heads ["mask_0", ...]    (stage k's masks: graph mask_k)
    graphs {name: {file, sha256, bytes, external_data [{file, sha256, bytes}],
                   inputs [{name, dtype, shape}], outputs [...], nodes, export_seconds}}
    initial_queries {file, sha256, bytes, dtype, shape}
    verification {T, H, W, reference, max_abs_error {graph: {output: error}}}   (absent: skipped)
    model {config name, backbone, ...}                 informative
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from efficientvis.errors import UserError
from efficientvis.ytvis.results import write_json_atomic

FORMAT = "efficientvis-onnx"
FORMAT_VERSION = 4
# what changed at each version, for the message that refuses an older export
OLDER_FORMATS = {1: "its graphs output mask logits, not mask_probs",
                 2: "its stage graphs include their mask heads, which are graphs of their own now",
                 3: "its stage_0 has no carried/carried_boxes inputs"}
FILENAME = "manifest.json"
CPU_FORM_SUFFIX = ".cpu.onnx"  # a QDQ_DIR graph's ONNX Runtime CPU form (calibration/quantize.py)


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(model_dir: str, name: str) -> dict:
    """{file, sha256, bytes} of MODEL_DIR/name."""
    path = os.path.join(model_dir, name)
    return {"file": name, "sha256": sha256_of(path), "bytes": os.path.getsize(path)}


def write(model_dir: str, data: dict) -> str:
    """Write MODEL_DIR/manifest.json atomically (temporary file in the same folder, fsync, rename)."""
    path = os.path.join(model_dir, FILENAME)
    write_json_atomic(path, data, indent=2)
    return path


@dataclass
class Manifest:
    """What the runtime needs from manifest.json (the whole dict is `data`)."""
    model_dir: str
    data: dict
    clip_length: int  # T (the longest clip the graphs take)
    num_queries: int  # N
    hidden_dim: int  # C
    num_stages: int  # M
    num_classes: int  # K
    class_names: list
    category_ids: list
    test_size: int
    max_size: int
    infer: dict = field(default_factory=dict)
    graphs: dict = field(default_factory=dict)  # name -> {file, sha256, inputs, outputs, ...}
    dynamic_axes: dict = field(default_factory=dict)  # axis -> {min, opt, max}
    _initial_queries: np.ndarray = None

    def __getitem__(self, key):
        return self.data[key]

    @property
    def graph_names(self) -> list:
        return list(self.graphs)

    @property
    def stages(self) -> list:
        return list(self.data.get("stages", []))

    @property
    def split_graphs(self) -> list:
        """backbone, stage_0 .. stage_{M-1}, mask_0 .. mask_{M-1}: what the split runtime runs."""
        M = self.num_stages
        return ["backbone"] + [f"stage_{k}" for k in range(M)] + [f"mask_{k}" for k in range(M)]

    def loop_options(self, clip_length=0, num_iterations=None, duplicate_iou=None):
        """The clip loop's settings from the manifest (T, input size, infer{}). clip_length 0: the
        manifest's T; num_iterations None: the manifest's infer.num_iterations, 0: all stages;
        duplicate_iou None: the manifest's infer.duplicate_iou."""
        from efficientvis.runtime.clip_loop import LoopOptions
        if num_iterations is None:
            num_iterations = self.infer_value("num_iterations", int, 0)
        return LoopOptions(clip_length=clip_length or self.clip_length, size=self.test_size,
                           max_size=self.max_size, num_iterations=num_iterations,
                           background_threshold=self.infer_value("background_threshold", float, 0.2),
                           reset_after=self.infer_value("reset_after", int, 3),
                           duplicate_iou=(self.infer_value("duplicate_iou", float, 0.0) if duplicate_iou is None
                                          else duplicate_iou),
                           carry_threshold=self.carry_threshold)

    @property
    def carry_threshold(self):
        """None, or the threshold of a model trained with model.carry_proposals."""
        value = self.data.get("carry_threshold")
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
            return float(value)
        raise UserError(f"{self.model_dir}/manifest.json: carry_threshold must be null or a number "
                        f"in [0, 1], got {value!r}")

    @property
    def top_k(self) -> int:
        top_k = self.infer_value("top_k", int, 10)
        if top_k < 1:
            raise UserError(f"{self.model_dir}/manifest.json: infer.top_k must be >= 1, got {top_k}")
        return top_k

    def infer_value(self, key, kind, default):
        """manifest.json's infer.<key> as `kind` (int or float), or one line naming it."""
        value = self.infer.get(key)
        if value is None:
            return default
        try:
            if isinstance(value, (bool, str)) or (kind is int and float(value) != int(value)):
                raise ValueError
            return kind(value)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"{self.model_dir}/manifest.json: infer.{key} must be "
                            f"{'a whole number' if kind is int else 'a number'}, got {value!r}") from None

    @property
    def onnxruntime_only(self) -> bool:
        """Exported with --roi-align grouped (NonZero: data-dependent shapes): no TensorRT."""
        return self.data.get("roi_align") == "grouped"

    def graph(self, name: str) -> dict:
        """The entry of graph `name` ("backbone", "stage_k", "mask_k", "model") with `path` added."""
        if name not in self.graphs:
            raise UserError(f"{self.model_dir}: the manifest has no graph '{name}' "
                            f"(graphs: {', '.join(self.graphs) or 'none'})")
        return dict(self.graphs[name], path=self.path(name))

    def path(self, graph):
        return os.path.join(self.model_dir, self.graphs[graph]["file"])

    def has(self, graph) -> bool:
        return graph in self.graphs and os.path.isfile(self.path(graph))

    def files(self):
        """(file, sha256) of every file the manifest lists: graphs (and their CPU forms), external
        data, q*."""
        out = []
        for graph in self.graphs.values():
            out.append((graph["file"], graph.get("sha256")))
            if "cpu_form" in graph:  # a QDQ_DIR's ONNX Runtime CPU form
                out.append((graph["cpu_form"]["file"], graph["cpu_form"].get("sha256")))
            out += [(e["file"], e.get("sha256")) for e in graph.get("external_data", []) or []]
        q = self.data.get("initial_queries")
        if isinstance(q, dict) and q.get("file"):
            out.append((q["file"], q.get("sha256")))
        return out

    def verify(self):
        """UserError naming the first listed file that is missing or whose sha256 differs."""
        for name, expected in self.files():
            path = os.path.join(self.model_dir, name)
            if not os.path.isfile(path):
                raise UserError(f"{path}: missing (listed in manifest.json; export again)")
            if expected and sha256_of(path) != expected:
                raise UserError(f"{path}: corrupt or modified (sha256 differs from manifest.json; "
                                f"export again)")

    @property
    def initial_queries(self) -> np.ndarray:
        """q* (N, C) float32."""
        if self._initial_queries is None:
            entry = self.data.get("initial_queries") or {}
            path = os.path.join(self.model_dir, entry.get("file", "initial_queries.npy"))
            try:
                q = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise UserError(f"{path}: cannot read q* ({e})") from None
            if q.shape != (self.num_queries, self.hidden_dim):
                raise UserError(f"{path}: q* has shape {q.shape}, the manifest says "
                                f"({self.num_queries}, {self.hidden_dim})")
            self._initial_queries = np.ascontiguousarray(q, np.float32)
        return self._initial_queries


def load(model_dir, verify=True) -> Manifest:
    """MODEL_DIR/manifest.json (also copied into an ENGINE_DIR); with `verify`, every listed file
    is checked against its sha256. Bad folders/files are one-line UserErrors."""
    if not os.path.isdir(model_dir):
        raise UserError(f"model folder not found: {model_dir}")
    path = os.path.join(model_dir, FILENAME)
    if not os.path.isfile(path):
        raise UserError(f"{model_dir}: no manifest.json (not a complete `evis export` folder)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not an {FORMAT} manifest")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{path}: manifest format version {version!r} is newer than this runtime "
                        f"reads ({FORMAT_VERSION}); upgrade efficientvis")
    if version < FORMAT_VERSION:
        raise UserError(f"{path}: manifest format version {version} comes from an older evis export "
                        f"({OLDER_FORMATS.get(version, 'another graph interface')}); export the checkpoint "
                        f"again, then calibrate and build engines from the new export")
    try:
        graphs = data["graphs"]
        if not isinstance(graphs, dict) or not graphs or \
                not all(isinstance(g, dict) and g.get("file") for g in graphs.values()):
            raise ValueError("no graphs listed")
        for g in graphs.values():
            form = g.get("cpu_form")
            if form is not None and not (isinstance(form, dict) and form.get("file")):
                raise ValueError("a graph's cpu_form names no file")
        pre = data["preprocessing"]
        manifest = Manifest(
            model_dir=model_dir, data=data, clip_length=int(data["T"]), num_queries=int(data["N"]),
            hidden_dim=int(data["C"]), num_stages=int(data["M"]), num_classes=int(data["K"]),
            class_names=[str(c) for c in data["class_names"]],
            category_ids=[int(c) for c in data["category_ids"]],
            test_size=int(pre["test_size"]), max_size=int(pre.get("max_size") or 0),
            infer=dict(data.get("infer") or {}), graphs=graphs,
            dynamic_axes=dict(data.get("dynamic_axes") or {}))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: incomplete manifest ({type(e).__name__}: {e})") from None
    if len(manifest.category_ids) != manifest.num_classes or len(manifest.class_names) != manifest.num_classes:
        raise UserError(f"{path}: {len(manifest.class_names)} class names and {len(manifest.category_ids)} "
                        f"category ids for K = {manifest.num_classes} classes")
    if verify:
        manifest.verify()
    return manifest
