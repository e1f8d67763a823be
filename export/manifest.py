"""manifest.json of an exported MODEL_DIR: what the runtime and the TensorRT builder read.

json + hashlib only (no torch, no onnx): the runtime imports this module.

`evis export` writes the manifest last and atomically (`write`), so a folder with a manifest is a
complete export; `load(model_dir)` reads it back and checks the sha256 of every file it lists
(graphs, their external-data files, q*), raising a UserError that names a missing or changed file.

Schema (FORMAT = "efficientvis-onnx", FORMAT_VERSION = 1; keys in ARCHITECTURE.md):

    format, format_version, package_version, created (UTC, ISO 8601)
    opset, roi_align ("roialign" | "gridsample"), exporter {torch, onnx}
    T (max clip length), N, C, M (stages), K (classes), mask_size
    class_names [K], category_ids [K]
    preprocessing {dtype, layout, colour, value_range, normalisation {where, mean, std},
                   resize, test_size, max_size, interpolation}
    infer {top_k, reset_after, background_threshold, linking, num_iterations}
    dynamic_axes {axis: {min, opt, max[, expr]}}       T, H, W and the feature-map axes
                                                        H4 = ceil(H/4) ... W32 = ceil(W/32)
    stages ["stage_0", ...]
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
import tempfile

from efficientvis.errors import UserError

FORMAT = "efficientvis-onnx"
FORMAT_VERSION = 1
FILENAME = "manifest.json"


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
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=model_dir)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the manifest is as readable as the graphs
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


class Manifest:
    """A loaded manifest: `data` (the dict), `model_dir`, accessors for what readers need."""

    def __init__(self, model_dir: str, data: dict):
        self.model_dir = model_dir
        self.data = data

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    @property
    def graph_names(self) -> list:
        return list(self.data.get("graphs", {}))

    @property
    def stages(self) -> list:
        return list(self.data.get("stages", []))

    def has(self, name: str) -> bool:
        return name in self.data.get("graphs", {})

    def graph(self, name: str) -> dict:
        """The entry of graph `name` ("backbone", "stage_k", "model") with `path` added."""
        graphs = self.data.get("graphs", {})
        if name not in graphs:
            raise UserError(f"{self.model_dir}: the manifest has no graph '{name}' "
                            f"(graphs: {', '.join(graphs) or 'none'})")
        return dict(graphs[name], path=os.path.join(self.model_dir, graphs[name]["file"]))

    def path(self, name: str) -> str:
        return self.graph(name)["path"]

    def files(self) -> list:
        """Every (relative file name, sha256) the manifest lists."""
        out = []
        for graph in self.data.get("graphs", {}).values():
            out.append((graph["file"], graph.get("sha256")))
            out += [(e["file"], e.get("sha256")) for e in graph.get("external_data", [])]
        q = self.data.get("initial_queries")
        if q:
            out.append((q["file"], q.get("sha256")))
        return out

    def verify(self) -> None:
        """UserError naming the first listed file that is missing or whose sha256 differs."""
        for name, expected in self.files():
            path = os.path.join(self.model_dir, name)
            if not os.path.isfile(path):
                raise UserError(f"{path}: missing (listed in {FILENAME}; export again)")
            if expected and sha256_of(path) != expected:
                raise UserError(f"{path}: corrupt or modified (sha256 differs from {FILENAME}; "
                                f"export again)")


def load(model_dir: str, verify: bool = True) -> Manifest:
    """Read MODEL_DIR/manifest.json; with `verify`, check every listed file's sha256."""
    if not os.path.isdir(model_dir):
        raise UserError(f"model folder not found: {model_dir}")
    path = os.path.join(model_dir, FILENAME)
    if not os.path.isfile(path):
        raise UserError(f"{model_dir}: no {FILENAME} (not a complete `evis export` folder)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not an {FORMAT} manifest")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{path}: manifest format version {version!r} is newer than this "
                        f"efficientvis reads ({FORMAT_VERSION}); upgrade efficientvis")
    graphs = data.get("graphs")
    if not isinstance(graphs, dict) or not graphs or \
            not all(isinstance(g, dict) and g.get("file") for g in graphs.values()):
        raise UserError(f"{path}: no graphs listed")
    manifest = Manifest(model_dir, data)
    if verify:
        manifest.verify()
    return manifest
