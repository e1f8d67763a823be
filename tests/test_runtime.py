"""The torch-free runtime: ONNX Runtime backend vs PyTorch, `evis run` outputs, Ctrl-C, bad input,
torch made unimportable, TensorRT engine metadata (TensorRT itself only where it imports).

One tiny random-weight model (ResNet-18 at 1/4 width, C=32, N=4, M=2, T=4, 64-pixel frames) is
exported once per session with `evis export` (efficientvis.export.export); its class biases are
raised so that most slots are foreground and there are tracks to compare. It is configured with
model.carry_proposals, so the clip loop feeds stage_0 carried boxes wherever a manifest is read.
"""

import ctypes
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types

import cv2
import numpy as np
import pytest

from efficientvis.errors import UserError
from efficientvis.runtime import outputs as outputs_mod
from efficientvis.runtime.carry import carried_proposals
from efficientvis.runtime.clip_loop import FrameResult, Instance, LoopOptions, run_clips
from efficientvis.runtime.trt_backend import check_engine_metadata, is_engine_dir, read_engine_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1"}
EVIS = [sys.executable, "-c", "import sys; from efficientvis.cli import main; sys.exit(main())"]
CLASS_NAMES = ["disc", "square", "triangle", "star", "cross", "ring"]
CATEGORY_IDS = [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------------------------
# fixtures: a tiny exported model and synthetic videos (once per session)

@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from efficientvis.export.export import export_model
    from efficientvis.training import checkpoint
    from efficientvis.training.config import load_config
    from efficientvis.training.model import build_model

    root = tmp_path_factory.mktemp("exported")
    cfg = load_config("tiny")
    cfg.model.hidden_dim, cfg.model.num_queries, cfg.model.num_iterations = 32, 4, 2
    cfg.model.clip_length, cfg.model.ffn_dim, cfg.model.dynamic_dim = 4, 64, 8
    cfg.model.mask_convs, cfg.model.mask_conv_dim = 4, 0  # the QueryInst mask head, not the tiny recipe's
    cfg.data.test_size, cfg.data.max_size = 64, 112
    cfg.model.carry_proposals, cfg.model.carry_threshold = True, 0.2
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # most slots foreground, classes differing: tracks to compare
        for it in model.iterations:
            it.class_logits.bias.copy_(torch.linspace(2.0, 5.5, cfg.model.num_classes))
    ckpt = str(root / "tiny.pt")
    checkpoint.save(ckpt, model=model.state_dict(), config=cfg.to_dict(), class_names=CLASS_NAMES,
                    category_ids=CATEGORY_IDS)
    model_dir = str(root / "model")
    export_model(ckpt, model_dir, fused=True, verify=False, log=lambda m: None)
    return {"checkpoint": ckpt, "model_dir": model_dir, "cfg": cfg}


@pytest.fixture(scope="session")
def video(tmp_path_factory):
    from efficientvis.ytvis.synth import write_video

    folder = tmp_path_factory.mktemp("video")
    path = str(folder / "short.mp4")
    gt = write_video(path, frames=14, height=72, width=120, seed=3)
    return {"path": path, "gt": gt, "frames": 14}


def _torch_backend(exported):
    pytest.importorskip("torch")
    from efficientvis.training.infer import TorchBackend, load_model

    model, cfg, _ = load_model(exported["checkpoint"], "cpu")
    return TorchBackend(model, "cpu"), cfg


def _read_frames(path):
    cap = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def _evis(args, **kw):
    return subprocess.run([*EVIS, *args], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=240, **kw)


# ----------------------------------------------------------------------------------------------
# ONNX Runtime backend vs PyTorch

def _assert_close(a, b, name, atol=1e-4, rtol=1e-5):
    err = float(np.abs(a.astype(np.float64) - b).max())
    tol = atol + rtol * float(np.abs(b).max())
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"
    return err


def _carry(out, reset):
    """The clip loop's carried proposals after a clip's outputs (the fixture model's threshold)."""
    return carried_proposals(1 / (1 + np.exp(-out["class_logits"])), out["boxes"], 0.2, reset)


def test_ort_backend_matches_pytorch_per_clip(exported):
    from efficientvis.runtime.ort_backend import OrtBackend

    torch_b, _ = _torch_backend(exported)
    ort_b = OrtBackend(exported["model_dir"], threads=1)
    assert (ort_b.num_queries, ort_b.clip_length, ort_b.providers_in_use()) == (4, 4, ["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    torch_b.start_video()
    ort_b.start_video()
    errors, carried = {}, None
    # full clips, a shorter last clip, another frame size, a reset of two slots; carried proposals
    # from the second clip on (the first frame size's boxes: the runtime never changes size mid-video)
    for i, (T, H, W) in enumerate([(4, 64, 112), (4, 64, 112), (2, 64, 112), (3, 96, 64)]):
        frames = rng.integers(0, 256, (T, 3, H, W), dtype=np.uint8)
        reset = np.zeros(4, bool)
        if i == 2:
            reset[[1, 3]] = True
        ref = torch_b.run_clip(frames, reset, None, carried)
        got = ort_b.run_clip(frames, reset, None, carried)
        carried = _carry(ref, reset)
        carried[0][0] = False  # one slot from the learned boxes
        for key in ("class_logits", "boxes", "mask_probs"):
            assert got[key].shape == ref[key].shape and got[key].dtype == np.float32
            # boxes are pixels (values up to ~10^2..10^3): 1e-4 absolute plus float32 relative slack
            errors[key] = max(errors.get(key, 0), _assert_close(got[key], ref[key], key))
    print("max abs errors ORT vs PyTorch:", errors)


def test_anytime_inference_and_io_binding_path(exported):
    """Fewer stages == PyTorch with num_iterations=K; the IO-binding path (device OrtValues kept
    between stages and clips, as on CUDA) run on CPU memory gives the same numbers as plain run()."""
    from efficientvis.runtime.ort_backend import OrtBackend

    torch_b, _ = _torch_backend(exported)
    plain = OrtBackend(exported["model_dir"], threads=1)
    bound = OrtBackend(exported["model_dir"], threads=1)
    bound.on_device, bound.device_type = True, "cpu"
    rng = np.random.default_rng(1)
    for b in (torch_b, plain, bound):
        b.start_video()
    carried = None
    for i in range(3):
        frames = rng.integers(0, 256, (4, 3, 64, 112), dtype=np.uint8)
        reset = np.array([False, i == 2, False, False])
        ref = torch_b.run_clip(frames, reset, 1, carried)
        a = plain.run_clip(frames, reset, 1, carried)
        b = bound.run_clip(frames, reset, 1, carried)
        carried = _carry(ref, reset)
        for key in ref:
            _assert_close(a[key], ref[key], key)
            np.testing.assert_array_equal(a[key], b[key])
    assert isinstance(bound.queries, bound.ort.OrtValue)  # stayed an OrtValue between clips
    with pytest.raises(UserError, match="2 stages"):
        plain.run_clip(frames, None, 3)


def test_fused_model_matches_split_graphs(exported):
    from efficientvis.runtime.ort_backend import OrtBackend

    split = OrtBackend(exported["model_dir"], threads=1)
    fused = OrtBackend(exported["model_dir"], threads=1, fused=True)
    fused_bound = OrtBackend(exported["model_dir"], threads=1, fused=True)
    fused_bound.on_device, fused_bound.device_type = True, "cpu"
    assert list(fused.sessions) == ["model"] and len(split.sessions) == 5  # backbone, 2 stages, 2 mask heads
    # no spinning threads left behind to steal the cores the next graph runs on (tiny model, 2
    # cores: 59-64 ms per clip against 169-191 ms with ONNX Runtime's default)
    spin = "session.intra_op.allow_spinning"
    sessions = list(split.sessions.values()) + [fused.sessions["model"]]
    assert {s.get_session_options().get_session_config_entry(spin) for s in sessions} == {"0"}
    rng = np.random.default_rng(2)
    for b in (split, fused, fused_bound):
        b.start_video()
    carried = None
    for i in range(3):
        frames = rng.integers(0, 256, (4 - i, 3, 64, 112), dtype=np.uint8)
        reset = np.array([i == 1, False, False, i == 1])
        ref = split.run_clip(frames, reset, None, carried)
        for b in (fused, fused_bound):
            got = b.run_clip(frames, reset, None, carried)
            for key in ref:
                _assert_close(got[key], ref[key], key, atol=1e-5)
        carried = _carry(ref, reset)
    with pytest.raises(UserError, match="anytime inference"):
        fused.run_clip(frames, None, 1)


def test_same_tracks_as_pytorch_over_a_video(exported, video):
    from efficientvis.runtime.ort_backend import OrtBackend

    torch_b, cfg = _torch_backend(exported)
    ort_b = OrtBackend(exported["model_dir"], threads=1)
    options = ort_b.manifest.loop_options(4)  # carried proposals (threshold 0.2) from the manifest
    assert options.carry_threshold == 0.2 and options.size == cfg.data.test_size
    frames = _read_frames(video["path"])
    ref = list(run_clips(torch_b, iter(frames), options))
    got = list(run_clips(ort_b, iter(frames), options))
    assert len(ref) == len(got) == video["frames"]
    n_instances = 0
    for r, g in zip(ref, got):
        assert [(i.track_id, i.label) for i in r.instances] == [(i.track_id, i.label) for i in g.instances]
        for a, b in zip(r.instances, g.instances):
            assert (a.mask != b.mask).mean() < 1e-3  # pixels exactly at the 0.5 threshold may flip
            np.testing.assert_allclose(a.class_probs, b.class_probs, atol=1e-4)
            n_instances += 1
    assert n_instances > 0 and len({i.track_id for r in got for i in r.instances}) >= 2


def test_a_manifest_that_does_not_match_its_graphs_is_one_line(exported, tmp_path):
    """The manifest is not covered by the sha256 checks (it holds them): a tensor it names that
    the graph lacks, or a class count other than the graphs', is refused when the model loads."""
    from efficientvis.runtime.ort_backend import OrtBackend

    for name, edit, message in [
        ("renamed", lambda m: m["graphs"]["stage_0"]["inputs"][0].update(name="p2_renamed"),
         "the manifest names a tensor 'p2_renamed' that the graph does not have"),
        ("classes", lambda m: m.update(K=m["K"] + 1, class_names=m["class_names"] + ["extra"],
                                       category_ids=m["category_ids"] + [99]),
         "class_logits is [4, 'T', 6] but the manifest says N = 4 queries and K = 7 classes")]:
        model_dir = str(tmp_path / name)
        shutil.copytree(exported["model_dir"], model_dir)
        path = os.path.join(model_dir, "manifest.json")
        with open(path) as f:
            manifest = json.load(f)
        edit(manifest)
        with open(path, "w") as f:
            json.dump(manifest, f)
        with pytest.raises(UserError, match=re.escape(message)):
            OrtBackend(model_dir, threads=1)
    # manifest infer values of the wrong type or range: one line naming the manifest and the key
    from efficientvis.runtime import manifest as manifest_lib

    m = manifest_lib.load(exported["model_dir"])
    for key, value, message in [("num_iterations", "two", "infer.num_iterations must be a whole number"),
                                ("num_iterations", 2.5, "infer.num_iterations must be a whole number"),
                                ("reset_after", float("inf"), "infer.reset_after must be a whole number"),
                                ("background_threshold", float("nan"), "infer.background_threshold = nan"),
                                ("top_k", 0, "infer.top_k must be >= 1")]:
        m.infer = {key: value}
        with pytest.raises(UserError, match=re.escape(message)):
            m.loop_options(), m.top_k


def test_requested_gpu_provider_falls_back_with_a_warning(exported, capsys):
    import onnxruntime as ort

    from efficientvis.runtime.ort_backend import OrtBackend, content_key

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA")
    b = OrtBackend(exported["model_dir"], provider="tensorrt", fp16=True, threads=1,
                   cache_dir=str(exported["model_dir"]) + "_cache",
                   profile_shapes={"min": (1, 64, 112), "opt": (4, 64, 112), "max": (4, 64, 112)})
    assert b.providers_in_use() == ["CPUExecutionProvider"] and not b.on_device
    assert "TensorrtExecutionProvider was requested" in capsys.readouterr().err
    # the TensorRT EP options that would be used (profiles from the manifest's named axes)
    key = content_key(b.manifest.graphs["stage_1"], None)
    name, opts = b._providers("stage_1", True, False, None, None, key)[0]
    assert name == "TensorrtExecutionProvider" and opts["trt_fp16_enable"] and not opts["trt_int8_enable"]
    assert opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"]
    # ONNX Runtime names engines without their weights: one engine folder per graph content
    cache = os.path.join(exported["model_dir"], "trt_cache")
    assert (opts["trt_engine_cache_path"], opts["trt_timing_cache_path"]) == (os.path.join(cache, key), cache)
    assert key != content_key({**b.manifest.graphs["stage_1"], "sha256": "0" * 64}, None)
    assert key != content_key(b.manifest.graphs["stage_0"], None)
    assert opts["trt_profile_min_shapes"].startswith("p2:1x32x8x8,")
    assert "queries_in:4x4x32" in opts["trt_profile_max_shapes"]
    b.start_video()
    out = b.run_clip(np.zeros((2, 3, 64, 112), np.uint8), None)
    assert out["class_logits"].shape == (4, 2, 6)
    with pytest.raises(UserError, match="--fp16 needs --provider tensorrt"):
        OrtBackend(exported["model_dir"], provider="cpu", fp16=True)


# ----------------------------------------------------------------------------------------------
# torch made unimportable

def _blocking(module):
    """The start of a Python script in which `module` cannot be imported."""
    return textwrap.dedent(f"""
        import sys
        class _Blocked:
            def find_spec(self, name, path=None, target=None):
                if name == {module!r} or name.startswith({module + '.'!r}):
                    raise ImportError("{module} is blocked in this test")
                return None
        sys.meta_path.insert(0, _Blocked())
    """)


def test_runtime_runs_with_torch_unimportable(exported, tmp_path):
    script = _blocking("torch") + textwrap.dedent(f"""
        import numpy as np, cv2
        import efficientvis.runtime.sources, efficientvis.runtime.outputs, efficientvis.runtime.run
        import efficientvis.runtime.trt_backend, efficientvis.runtime.linking, efficientvis.runtime.collect
        from efficientvis.runtime.ort_backend import OrtBackend
        from efficientvis.runtime.clip_loop import LoopOptions, run_clips
        backend = OrtBackend({exported['model_dir']!r}, threads=1)
        frames = [np.full((72, 120, 3), 40 * i, np.uint8) for i in range(6)]
        results = list(run_clips(backend, iter(frames), LoopOptions(clip_length=4, size=64, max_size=112)))
        assert len(results) == 6
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch imported"
        print("ok", sum(len(r.instances) for r in results))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")
    # and `evis run --help` does not need torch either
    proc = subprocess.run([sys.executable, "-c", script.split("import numpy")[0] +
                           "from efficientvis.cli import main\nsys.exit(main(['run', '--help']))"],
                          env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--source" in proc.stdout, proc.stderr[-2000:]


def test_backends_and_engine_builder_import_without_opencv():
    """OpenCV is an extra (pyproject.toml): `evis build` and the backends must not need it."""
    script = _blocking("cv2") + textwrap.dedent("""
        import efficientvis.runtime.ort_backend, efficientvis.runtime.trt_backend, efficientvis.export.engine
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# evis run

def _check_outputs(out_dir, frames, size):
    lines = open(os.path.join(out_dir, "tracks.jsonl")).read().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["frame"] for r in records] == list(range(len(records)))
    assert len(records) == frames
    for r in records:
        for t in r["tracks"]:
            assert set(t) == {"id", "class", "category_id", "score", "box", "mask"}
            assert t["class"] in CLASS_NAMES and t["category_id"] == CATEGORY_IDS[CLASS_NAMES.index(t["class"])]
            assert t["mask"]["size"] == [size[1], size[0]] and len(t["box"]) == 4
    overlay = [f for f in os.listdir(out_dir) if f.startswith("overlay")]
    video_frames = _read_frames(os.path.join(out_dir, overlay[0])) if overlay else []
    return records, video_frames


def test_evis_run_writes_all_outputs(exported, video, tmp_path):
    from efficientvis.ytvis import format as ytvis_format
    from efficientvis.ytvis.metric import validate_results

    out = str(tmp_path / "out")
    proc = _evis(["run", "--model", exported["model_dir"], "--source", video["path"], "--out", out,
                  "--threads", "1", "--show"])
    assert proc.returncode == 0, proc.stderr
    records, overlay = _check_outputs(out, video["frames"], (120, 72))
    assert sum(len(r["tracks"]) for r in records) > 0
    assert len(overlay) == video["frames"] and overlay[0].shape == (72, 120, 3)
    results = json.load(open(os.path.join(out, "results.json")))
    gt = ytvis_format.load(video["gt"])
    assert validate_results(gt, results) and len(results) <= 10
    assert {r["category_id"] for r in results} <= set(CATEGORY_IDS)
    for name in ("overlay.mp4", "tracks.jsonl", "results.json"):
        assert os.path.join(out, name) in proc.stdout
    assert "--show ignored" in proc.stderr and "FPS" in proc.stdout


def test_evis_run_anytime_short_clips_folder_avi_max_frames(exported, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(9):
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), np.full((60, 80, 3), 25 * i, np.uint8))
    out = str(tmp_path / "out")
    proc = _evis(["run", "--model", exported["model_dir"], "--source", str(folder), "--out", out,
                  "--stages", "1", "--clip", "3", "--max-frames", "7", "--video-format", "avi",
                  "--threads", "1"])
    assert proc.returncode == 0, proc.stderr
    records, overlay = _check_outputs(out, 7, (80, 60))
    assert len(overlay) == 7 and os.path.exists(os.path.join(out, "overlay.avi"))
    assert "1/2 stages" in proc.stderr and "clips of 3" in proc.stderr
    # --no-results: tracks.jsonl only (long file runs keep a flat memory, docs/benchmarks.md)
    lean = str(tmp_path / "lean")
    proc = _evis(["run", "--model", exported["model_dir"], "--source", str(folder), "--out", lean,
                  "--no-video", "--no-results", "--threads", "1"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(lean)) == ["tracks.jsonl"]
    assert sum(1 for _ in open(os.path.join(lean, "tracks.jsonl"))) == 9
    proc = _evis(["run", "--model", exported["model_dir"], "--source", str(folder), "--out", out,
                  "--no-video", "--stages", "3"])
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "--stages" in proc.stderr
    proc = _evis(["run", "--model", exported["model_dir"], "--source", str(folder), "--out", out,
                  "--no-video", "--clip", "99"])
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--clip must be 1.." in proc.stderr and "evis export --max-clip" in proc.stderr
    # --fused (model.onnx): the same tracks as the split graphs, and no anytime inference
    fused = str(tmp_path / "fused")
    proc = _evis(["run", "--model", exported["model_dir"], "--source", str(folder), "--out", fused,
                  "--no-video", "--no-results", "--threads", "1", "--fused"])
    assert proc.returncode == 0, proc.stderr
    split_lines = [json.loads(line) for line in open(os.path.join(lean, "tracks.jsonl"))]
    fused_lines = [json.loads(line) for line in open(os.path.join(fused, "tracks.jsonl"))]
    assert [[(t["id"], t["class"]) for t in r["tracks"]] for r in fused_lines] == \
        [[(t["id"], t["class"]) for t in r["tracks"]] for r in split_lines]
    from pycocotools import mask as mask_utils
    for a, b in zip(fused_lines, split_lines):
        for ta, tb in zip(a["tracks"], b["tracks"]):
            ra, rb = ({**t["mask"], "counts": t["mask"]["counts"].encode()} for t in (ta, tb))
            assert mask_utils.iou([ra], [rb], [0])[0, 0] >= 0.99
    proc = _evis(["run", "--model", exported["model_dir"], "--source", str(folder), "--out", fused,
                  "--no-video", "--fused", "--stages", "1"])
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "--fused" in proc.stderr


def test_sigint_keeps_complete_outputs(exported, tmp_path):
    from efficientvis.ytvis.synth import write_video

    long_video = str(tmp_path / "long.mp4")
    write_video(long_video, frames=400, height=72, width=120, seed=5)
    out = str(tmp_path / "out")
    proc = subprocess.Popen([*EVIS, "run", "--model", exported["model_dir"],
                             "--source", long_video, "--out", out, "--threads", "1"],
                            env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tracks = os.path.join(out, "tracks.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(tracks) and os.path.getsize(tracks) > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    records, overlay = _check_outputs(out, len(open(tracks).read().splitlines()), (120, 72))
    assert 4 <= len(records) < 400
    assert len(overlay) == len(records)  # the MP4 was finalised and holds every processed frame
    results = json.load(open(os.path.join(out, "results.json")))
    assert all(len(r["segmentations"]) == len(records) for r in results)
    assert "interrupted" in stderr and not os.path.exists(os.path.join(out, "results.json.partial"))


def test_bad_input_is_one_line(exported, video, tmp_path):
    def run(*args):
        proc = _evis(["run", *args, "--out", str(tmp_path / "out"), "--no-video"])
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("evis run: error: "), proc.stderr
        return lines[0]

    model = exported["model_dir"]
    assert "model folder not found" in run("--model", str(tmp_path / "nope"), "--source", video["path"])
    corrupt = str(tmp_path / "corrupt_model")
    shutil.copytree(model, corrupt)
    with open(os.path.join(corrupt, "stage_1.onnx"), "ab") as f:
        f.write(b"\0garbage")
    assert "stage_1.onnx: corrupt or modified (sha256" in run("--model", corrupt, "--source", video["path"])
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(4096))
    assert "bad.mp4" in run("--model", model, "--source", str(bad))
    assert "camera 7" in run("--model", model, "--source", "7")
    assert "GStreamer" in run("--model", model, "--source", "csi://0")
    thin = tmp_path / "thin"
    thin.mkdir()
    cv2.imwrite(str(thin / "0.png"), np.zeros((4, 400, 3), np.uint8))
    assert "the exported graphs take 32..112 x 32..112 pixels" in run("--model", model, "--source", str(thin))
    assert "--duplicate-iou must be in [0, 1]" in run("--model", model, "--source", "7", "--duplicate-iou", "1.5")


# ----------------------------------------------------------------------------------------------
# outputs (unit level)

def _instance(track_id, h=40, w=60):
    mask = np.zeros((h, w), bool)
    mask[5:20, 10:30] = True
    probs = np.full(6, 0.05, np.float32)
    probs[track_id % 6] = 0.9
    return Instance(track_id, probs, np.array([10, 5, 30, 20], np.float32), mask)


def test_first_line_names_what_an_onnx_runtime_backend_runs():
    """evis run's first line adds the precision and the Q/DQ CPU form for ONNX Runtime, and a
    RoIAlign form other than the default; a TensorRT backend names its precision itself."""
    from types import SimpleNamespace

    from efficientvis.runtime.run import _graphs_note

    static, grouped = SimpleNamespace(data={"roi_align": "roialign"}), SimpleNamespace(data={"roi_align": "grouped"})
    ort_fp32 = SimpleNamespace(precision="fp32", files={"backbone": "m/backbone.onnx"})
    ort_int8 = SimpleNamespace(precision="int8", files={"backbone": "q/backbone.cpu.onnx", "mask_0": "q/mask_0.onnx"})
    trt = SimpleNamespace(precision="fp16")  # TrtBackend: "TensorRT fp16" is its provider label
    assert _graphs_note(ort_fp32, static) == "" and _graphs_note(trt, static) == ""
    assert _graphs_note(ort_int8, grouped) == ", INT8 (backbone.cpu.onnx), RoIAlign grouped"


def test_track_colours_are_stable_and_distinct():
    colours = [outputs_mod.track_colour(i) for i in range(1, 13)]
    assert colours == [outputs_mod.track_colour(i) for i in range(1, 13)]
    assert len(set(colours)) == 12
    image = outputs_mod.draw_instances(np.zeros((40, 60, 3), np.uint8), [_instance(3)], CLASS_NAMES)
    assert image[10, 20].any() and not image[35, 55].any()


def test_tracks_jsonl_is_written_per_clip(tmp_path):
    path = str(tmp_path / "tracks.jsonl")
    w = outputs_mod.TracksJsonl(path, CLASS_NAMES, CATEGORY_IDS)
    w.add(FrameResult(0, None, [_instance(1), _instance(2)]))
    w.add(FrameResult(1, None, []))
    assert open(path).read() == ""  # nothing before the clip is complete
    w.end_clip()
    w.add(FrameResult(2, None, [_instance(4)]))  # a clip cut short: written on close
    lines = open(path).read().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["tracks"][1]["class"] == "triangle"
    w.close()
    last = json.loads(open(path).read().splitlines()[-1])
    assert last["frame"] == 2 and last["tracks"][0]["category_id"] == 5


def test_overlay_writer_fails_clearly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write the overlay video|File exists|Not a directory"):
        outputs_mod.OverlayVideo(str(blocker / "overlay.mp4"), 30, (64, 48))
    with pytest.raises(UserError, match="format"):
        outputs_mod.OverlayVideo(str(tmp_path / "o.mkv"), 30, (64, 48), fmt="mkv")


def test_avi_overlay_survives_a_hard_kill(tmp_path):
    """--video-format avi: readable even when the process dies without releasing the writer."""
    path = str(tmp_path / "overlay.avi")
    script = textwrap.dedent(f"""
        import os, numpy as np
        from efficientvis.runtime.outputs import OverlayVideo
        v = OverlayVideo({path!r}, 10, (64, 48), "avi")
        for i in range(40):
            v.write(np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8))
        os._exit(9)  # no release
    """)
    subprocess.run([sys.executable, "-c", script], env=ENV, timeout=60)
    assert len(_read_frames(path)) >= 30


def test_status_line_is_rate_limited():
    class Stream:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return True

    now = [0.0]
    stream = Stream()
    status = outputs_mod.StatusLine(stream, interval=0.25, clock=lambda: now[0])
    shown = 0
    for i in range(100):
        now[0] += 0.01
        shown += status.update(i + 1, clip_ms=120.0)
    assert shown == 4  # 1 s of updates at most every 0.25 s
    assert "FPS" in stream.text and "clip latency 120 ms" in stream.text


# ----------------------------------------------------------------------------------------------
# TensorRT engine metadata (pure Python) and the backend itself where TensorRT exists

def test_engine_metadata_check(tmp_path):
    meta = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7",
            "precision": "fp16", "profiles": [], "onnx_sha256": "ab"}
    assert check_engine_metadata(meta, "10.3.0.30", "Orin", (8, 7))
    with pytest.raises(UserError, match=r"built with TensorRT 10\.3\.0, this machine has TensorRT 11\.0\.0"):
        check_engine_metadata(meta, "11.0.0", "Orin", "8.7")
    with pytest.raises(UserError, match=r"built on Orin \(compute capability 8\.7\), this GPU is "
                                        r"NVIDIA H100 80GB HBM3 \(compute capability 9\.0\)"):
        check_engine_metadata(meta, "10.3.0", "NVIDIA H100 80GB HBM3", "9.0")
    engine = tmp_path / "backbone.engine"
    engine.write_bytes(b"plan")
    assert not is_engine_dir(str(tmp_path))
    with pytest.raises(UserError, match="metadata backbone.engine.json is missing"):
        read_engine_metadata(str(engine))
    (tmp_path / "backbone.engine.json").write_text(json.dumps({"tensorrt_version": "10.3"}))
    with pytest.raises(UserError, match="lacks gpu_name, compute_capability"):
        read_engine_metadata(str(engine))
    (tmp_path / "backbone.engine.json").write_text(json.dumps(meta))
    assert read_engine_metadata(str(engine)) == meta and is_engine_dir(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# the TensorRT backend's plumbing on stand-ins: `tensorrt` whose engines are ONNX Runtime sessions
# of the exported graphs, and `cudart` whose "device" memory is host memory that checks every copy
# and every tensor address against the allocation it points into

class _StandInCudart:
    class cudaError_t:  # noqa: N801 - cuda-python's names
        cudaSuccess = 0
        cudaErrorInvalidValue = 1

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        self.ctypes, self.device, self.pinned, self.copies = ctypes, {}, {}, []

    def _alloc(self, table, n):
        buf = self.ctypes.create_string_buffer(int(n))
        table[self.ctypes.addressof(buf)] = buf
        return 0, self.ctypes.addressof(buf)

    def cudaMalloc(self, n):  # noqa: N802
        return self._alloc(self.device, n)

    def cudaMallocHost(self, n):  # noqa: N802
        return self._alloc(self.pinned, n)

    def cudaFree(self, ptr):  # noqa: N802
        return (0,) if self.device.pop(ptr, None) is not None else (self.cudaError_t.cudaErrorInvalidValue,)

    def cudaFreeHost(self, ptr):  # noqa: N802
        return (0,) if self.pinned.pop(ptr, None) is not None else (self.cudaError_t.cudaErrorInvalidValue,)

    def inside(self, table, ptr, n):
        return any(base <= ptr and ptr + n <= base + len(buf) for base, buf in table.items())

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        device, host = (dst, src) if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else (src, dst)
        assert self.inside(self.device, device, n), f"copy of {n} bytes outside a device allocation"
        self.copies.append((kind, self.inside(self.pinned, host, n)))
        self.ctypes.memmove(dst, src, n)
        return (0,)

    def cudaGetDevice(self):  # noqa: N802
        return 0, 0

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        return 0, types.SimpleNamespace(name=b"Stand-in GPU\x00", major=8, minor=7)

    def cudaGetErrorString(self, err):  # noqa: N802
        return 0, b"cudaErrorInvalidValue"

    def cudaStreamCreate(self):  # noqa: N802
        return 0, 7

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return (0,)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        return (0,)


def _stand_in_tensorrt(cudart):
    """The TensorRT 10 runtime API TrtBackend uses; an engine file holds the graph's ONNX bytes."""
    import onnxruntime as ort

    class Engine:
        def __init__(self, onnx_bytes):
            self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            self.io = {t.name: ("INPUT", t) for t in self.session.get_inputs()}
            self.io.update({t.name: ("OUTPUT", t) for t in self.session.get_outputs()})
            self.num_io_tensors = len(self.io)

        def get_tensor_name(self, i):
            return list(self.io)[i]

        def get_tensor_mode(self, name):
            return self.io[name][0]

        def get_tensor_dtype(self, name):
            return {"tensor(float)": np.float32, "tensor(uint8)": np.uint8,
                    "tensor(float16)": np.float16}[self.io[name][1].type]

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.output_shapes = engine, {}, {}, {}

        def set_input_shape(self, name, shape):
            self.shapes[name], self.output_shapes = tuple(shape), {}
            return True

        def get_tensor_shape(self, name):
            if not self.output_shapes:  # TensorRT knows them from the input shapes: run on zeros
                feeds = {n: np.zeros(self.shapes[n], self.engine.get_tensor_dtype(n))
                         for n, (mode, _) in self.engine.io.items() if mode == "INPUT"}
                feeds = {n: (np.full_like(v, 64) if n == "image_size" else v) for n, v in feeds.items()}
                outs = self.engine.session.run(None, feeds)
                self.output_shapes = {o.name: v.shape for o, v in zip(self.engine.session.get_outputs(), outs)}
            return self.output_shapes[name]

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def _view(self, name, shape):
            dtype = np.dtype(self.engine.get_tensor_dtype(name))
            n = int(np.prod(shape)) * dtype.itemsize
            ptr = self.addresses[name]
            assert cudart.inside(cudart.device, ptr, n), f"{name}: {n} bytes outside a device allocation"
            raw = (ctypes.c_byte * max(n, 1)).from_address(ptr)
            return np.frombuffer(raw, dtype, int(np.prod(shape))).reshape(shape)

        def execute_async_v3(self, stream):
            feeds = {n: self._view(n, self.shapes[n]).copy()
                     for n, (mode, _) in self.engine.io.items() if mode == "INPUT"}
            outs = self.engine.session.run(None, feeds)
            for o, value in zip(self.engine.session.get_outputs(), outs):
                assert value.shape == tuple(self.get_tensor_shape(o.name)), o.name
                self._view(o.name, value.shape)[...] = value
            return True

    class Logger:
        INFO, WARNING = "INFO", "WARNING"

        def __init__(self, level):
            self.level = level

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return Engine(plan)

    return types.SimpleNamespace(
        __version__="10.3.0.26", Logger=Logger, Runtime=Runtime,
        init_libnvinfer_plugins=lambda logger, namespace: True,
        TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"), nptype=np.dtype)


def test_trt_backend_plumbing_matches_onnxruntime(exported, video, tmp_path, monkeypatch):
    """TrtBackend's buffers on stand-ins (engines = the exported graphs in ONNX Runtime): the
    stage-to-stage addresses, the two recurrent query buffers, slot resets, anytime inference and
    frame-size changes (buffers that grow) give the ONNX Runtime backend's numbers and tracks;
    every copy stays inside its allocation, frames and results go through pinned host memory, and
    close() frees everything."""
    from efficientvis.runtime.ort_backend import OrtBackend
    from efficientvis.runtime.trt_backend import TrtBackend

    cudart = _StandInCudart()
    cuda_pkg = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime, cuda_pkg.bindings = cudart, bindings
    for name, module in (("cuda", cuda_pkg), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart),
                         ("tensorrt", _stand_in_tensorrt(cudart))):
        monkeypatch.setitem(sys.modules, name, module)
    engine_dir = tmp_path / "engines"
    engine_dir.mkdir()
    for name in ("manifest.json", "initial_queries.npy"):
        shutil.copy(os.path.join(exported["model_dir"], name), engine_dir / name)
    meta = {"tensorrt_version": "10.3.0.26", "gpu_name": "Stand-in GPU", "compute_capability": "8.7",
            "precision": "fp32"}
    for g in ("backbone", "stage_0", "stage_1", "mask_0", "mask_1"):
        shutil.copy(os.path.join(exported["model_dir"], g + ".onnx"), engine_dir / (g + ".engine"))
        (engine_dir / (g + ".engine.json")).write_text(json.dumps(meta))
    assert is_engine_dir(str(engine_dir))

    trt_b = TrtBackend(str(engine_dir))
    ort_b = OrtBackend(exported["model_dir"], threads=1)
    assert trt_b.providers_in_use() == ["TensorRT fp32"]
    rng = np.random.default_rng(4)
    for b in (trt_b, ort_b):
        b.start_video()
    carried = None
    for i, (T, H, W, stages) in enumerate([(4, 64, 112, None), (4, 64, 112, 1), (2, 96, 128, None),
                                           (3, 64, 96, 2), (4, 64, 112, None)]):
        frames = rng.integers(0, 256, (T, 3, H, W), dtype=np.uint8)
        reset = np.array([i == 3, False, i == 3, False])
        ref = ort_b.run_clip(frames, reset, stages, carried)
        got = trt_b.run_clip(frames, reset, stages, carried)
        carried = _carry(ref, reset)
        for key in ref:
            assert got[key].dtype == np.float32 and got[key].shape == ref[key].shape, key
            _assert_close(got[key], ref[key], key, atol=1e-5)
    kept = got["mask_probs"].copy()
    trt_b.run_clip(frames[:1], None)
    np.testing.assert_array_equal(got["mask_probs"], kept)  # results are not views of reused buffers
    host_side = [pinned for _, pinned in cudart.copies]
    assert host_side.count(True) >= 5 * 7  # per clip: frames, image size, carried (2), 3 results
    with pytest.raises(UserError, match="--stages must be 1..2"):
        trt_b.run_clip(frames, None, 3)

    # whole video through the clip loop: the same tracks as ONNX Runtime
    options = ort_b.manifest.loop_options(4)  # with the manifest's carried proposals
    frames = _read_frames(video["path"])
    ref = list(run_clips(OrtBackend(exported["model_dir"], threads=1), iter(frames), options))
    got = list(run_clips(trt_b, iter(frames), options))
    assert [[(i.track_id, i.label) for i in r.instances] for r in ref] == \
           [[(i.track_id, i.label) for i in g.instances] for g in got]
    assert sum(len(r.instances) for r in got) > 0
    trt_b.close()
    assert cudart.device == {} and cudart.pinned == {}


def test_trt_backend_on_a_gpu(exported):  # pragma: no cover - needs TensorRT + a GPU
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda")
    engine_dir = os.path.join(os.path.dirname(exported["model_dir"]), "engines")
    if not os.path.isdir(engine_dir):
        pytest.skip("no engines built (evis build)")
    from efficientvis.runtime.trt_backend import TrtBackend

    backend = TrtBackend(engine_dir)
    backend.start_video()
    out = backend.run_clip(np.zeros((4, 3, 64, 112), np.uint8), None)
    assert out["class_logits"].shape == (4, 4, 6)


def test_slot_tracker_keeps_ids_and_resets_after_k_background_clips():
    """A slot keeps its id through short background gaps; after `reset_after` background clips it
    is reset (to q*) and its next object gets a new id; ids are never reused."""
    from efficientvis.runtime.tracker import SlotTracker

    def clip(*fg):  # per slot: foreground (max prob 0.9) or background (0.05)
        probs = np.full((len(fg), 2, 3), 0.05, np.float32)
        probs[[i for i, f in enumerate(fg) if f], 0, 1] = 0.9
        return probs

    tracker = SlotTracker(3, background_threshold=0.2, reset_after=2)
    seen = []
    for fg in [(1, 0, 1), (1, 0, 0), (1, 1, 0), (1, 1, 0), (0, 1, 1), (1, 1, 1)]:
        ids, reset = tracker.update(clip(*fg))
        seen.append((ids.tolist(), reset.tolist()))
    assert seen[0] == ([1, 0, 2], [False, False, False])
    assert seen[1] == ([1, 0, 0], [False, True, False])  # slot 1: 2 background clips -> reset
    assert seen[2] == ([1, 3, 0], [False, False, True])  # slot 2: 2 background clips -> reset
    assert seen[3][0] == [1, 3, 0]
    assert seen[4][0] == [0, 3, 4]  # slot 2's next object: a new id, not 2 again
    assert seen[5][0] == [1, 3, 4]  # slot 0 back after one background clip: same id


def test_duplicate_tracks_are_hidden_by_clip_mask_iou():
    """--duplicate-iou: of two slots whose masks overlap by the threshold's mean IoU over the
    clip, only the higher-scoring one is output; a slot that overlaps in one frame only, or a
    different object, stays."""
    from efficientvis.runtime.clip_loop import hidden_duplicates

    T, S = 3, 8
    masks = np.zeros((4, T, S, S), np.float32)
    masks[:, :, 1:7, 1:7] = 1.0  # every slot: a filled square in its box
    boxes = np.zeros((4, T, 4), np.float32)
    boxes[0] = boxes[1] = [10, 10, 50, 50]  # slots 0 and 1: one object (IoU 1)
    boxes[1, 2] = [12, 10, 52, 50]  # ... 0.9 in the last frame: mean IoU 0.97
    boxes[2] = [100, 10, 140, 50]  # slot 2: elsewhere, except in frame 0 where it covers slot 0
    boxes[2, 0] = [10, 10, 50, 50]
    boxes[3] = [60, 60, 90, 90]
    probs = np.full((4, T, 2), 0.1, np.float32)
    probs[:, :, 0] = [[0.9], [0.6], [0.5], [0.4]]
    hidden = hidden_duplicates([0, 1, 2, 3], probs, masks, boxes, 120, 160, min_iou=0.5)
    assert hidden == {1: [0]}  # slot 2: IoU 1 in frame 0, 0 after: mean 0.33
    probs[1, :, 0] = 0.95  # now slot 1 scores higher: slot 0 is the one hidden
    assert hidden_duplicates([0, 1, 2, 3], probs, masks, boxes, 120, 160, min_iou=0.5) == {0: [1]}
    assert hidden_duplicates([0, 1, 2, 3], probs, masks, boxes, 120, 160, min_iou=0.99) == {}
    # only frames where both have a mask count: slot 1 empty in frame 2 -> IoU 1 over frames 0-1
    masks[1, 2] = 0.0
    assert hidden_duplicates([0, 1, 2, 3], probs, masks, boxes, 120, 160, min_iou=0.99) == {0: [1]}
    with pytest.raises(UserError, match="duplicate_iou"):
        LoopOptions(clip_length=4, size=64, max_size=112, duplicate_iou=1.5)


class _ScriptedModel:
    """The backend interface (runtime/clip_loop.py) returning fixed outputs: the clip loop's own
    bookkeeping is what is tested, on outputs chosen by hand."""

    num_queries, clip_length = 2, 3

    def __init__(self, out):
        self.out = out
        self.calls = []  # (reset, carried) of every clip

    def start_video(self):
        pass

    def run_clip(self, frames, reset, num_iterations=None, carried=None):
        self.calls.append((np.array(reset), carried))
        return self.out() if callable(self.out) else self.out


def test_the_clip_loop_carries_the_boxes_of_foreground_slots_only():
    """With a manifest's carry_threshold, a slot whose class probability reached it in some frame
    starts the next clip from its last-frame box (input pixels, as the graphs output them); a
    background slot, a reset slot and a model without the rule carry nothing."""
    T, S = 2, 4
    clips = iter(range(4))

    def out():
        k = next(clips)
        logits = np.full((2, T, 3), -5.0, np.float32)
        logits[0, 1, 2] = 0.0 if k < 3 else -5.0  # slot 0: p 0.5 in one frame of clips 0-2
        boxes = np.stack([np.tile([k, k, 10 + k, 12 + k], (T, 1)), np.tile([1, 2, 3, 4], (T, 1))]).astype(np.float32)
        boxes[0, -1] += 100  # the last frame's box is the carried one
        return {"class_logits": logits, "boxes": boxes, "mask_probs": np.zeros((2, T, S, S), np.float32)}

    backend = _ScriptedModel(out)
    frames = [np.zeros((64, 64, 3), np.uint8)] * (4 * T)
    options = LoopOptions(clip_length=T, size=64, max_size=64, carry_threshold=0.3, reset_after=1)
    list(run_clips(backend, iter(frames), options))
    carried = [c for _, c in backend.calls]
    assert carried[0] is None  # a video's first clip: the learned proposals
    for k in (1, 2, 3):
        active, boxes = carried[k]
        assert active.tolist() == [True, False]  # slot 1 is background: reset after 1 clip, never carried
        np.testing.assert_array_equal(boxes[0], [k + 99, k + 99, k + 109, k + 111])
    assert backend.calls[2][0].tolist() == [False, True]
    with pytest.raises(UserError, match=r"model.carry_threshold = 1.5 is out of range"):
        LoopOptions(clip_length=4, size=64, max_size=112, carry_threshold=1.5)
    backend.calls, clips = [], iter(range(4))
    list(run_clips(backend, iter(frames), dataclasses.replace(options, carry_threshold=None)))
    assert [c for _, c in backend.calls] == [None] * 4


def test_a_hidden_duplicate_is_output_where_its_kept_slot_has_no_mask():
    T, S = 3, 8
    mask_probs = np.zeros((2, T, S, S), np.float32)
    mask_probs[:, :, 1:7, 1:7] = 1.0
    mask_probs[0, 2] = 0.0  # the surer slot 0 loses the object in frame 2
    boxes = np.tile(np.array([8, 8, 40, 40], np.float32), (2, T, 1))
    logits = np.full((2, T, 3), -5.0, np.float32)
    logits[0, :, 1], logits[1, :, 1] = 3.0, 1.0  # slot 0: p 0.95, slot 1: p 0.73
    backend = _ScriptedModel({"class_logits": logits, "boxes": boxes, "mask_probs": mask_probs})
    frames = [np.zeros((64, 64, 3), np.uint8)] * T

    def ids(duplicate_iou):
        options = LoopOptions(clip_length=T, size=64, max_size=64, duplicate_iou=duplicate_iou)
        return [[i.track_id for i in r.instances] for r in run_clips(backend, iter(frames), options)]

    assert ids(0.0) == [[1, 2], [1, 2], [2]]
    assert ids(0.5) == [[1], [1], [2]]  # slot 1 (id 2) only where slot 0 has no mask
