"""evis parity on a tiny random-weight model: FP32 ONNX Runtime passes (exit 0) with the documented
JSON; an impossible tolerance fails (exit 1); the Q/DQ option, tolerance flags and a mismatched
checkpoint/MODEL_DIR pair.

The tiny model (ResNet-18 at 1/8 width, C=32, N=4, M=2 stages, T=4, 64x112 input, class biases
raised so that slots are tracks) and two short synthetic YouTube-VIS videos are made by the
`tiny` fixture, which test_bench.py shares. Its export is the slow part (torch's dynamo exporter
takes 20-60 s per graph on a busy 2-core machine), so it is made once and kept in pytest's cache
folder (.pytest_cache) under a key of everything it depends on: the sources of training/,
export/export.py, export/graphs.py, runtime/manifest.py, the torch and onnx versions and this
file's model settings. A file lock makes the two test files (separate xdist workers) share one
export on a cold cache.
"""

import dataclasses
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from efficientvis.cli import main as evis  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(backbone="resnet18", backbone_width=8, norm="bn", freeze_at=0, hidden_dim=32, num_queries=4,
            num_iterations=2, clip_length=4, num_classes=6, num_heads=4, ffn_dim=64, dynamic_dim=8)
SIZES = dict(test_size=64, max_size=112)
CLASS_BIAS = (2.0, 5.5)  # linspace over the classes: most slots foreground, classes differ
SYNTH = dict(videos=2, frames=10, height=72, width=128, seed=2)
EXPORT_SOURCES = ["training", "export/export.py", "export/graphs.py", "runtime/manifest.py",
                  "efficientvis/__init__.py"]
TOP_KEYS = {"command", "format_version", "created", "package_version", "machine", "checkpoint", "model_dir",
            "qdq_dir", "engine_dirs", "data", "reference", "tolerances", "backends", "passed", "exit_code",
            "summary", "seconds"}
BACKEND_KEYS = {"name", "precision", "runtime", "providers", "status", "reason", "checks", "per_tensor",
                "end_to_end", "seconds"}
STATS_KEYS = {"shape", "max_abs", "mean_abs", "max_rel", "cosine", "ref_max_abs", "nonfinite", "bound", "passed"}
E2E_KEYS = {"videos", "tracks_reference", "tracks", "track_count", "class_agreement", "mask_iou", "mask_iou_min",
            "AP_reference", "AP", "delta_AP", "delta_AP50", "delta_AP75", "metrics", "per_video"}


def _key():
    digest = hashlib.sha256()
    for rel in EXPORT_SOURCES:
        path = os.path.join(REPO, rel)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith((".py", ".yaml")))
        for f in files:
            digest.update(os.path.relpath(f, REPO).encode())
            with open(f, "rb") as fh:
                digest.update(fh.read())
    digest.update(json.dumps([TINY, SIZES, CLASS_BIAS, SYNTH, torch.__version__, onnx.__version__],
                             sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _build(folder):
    """Checkpoint, export and synthetic data into `folder` (complete when manifest + annotations exist)."""
    from efficientvis.export.export import export_model
    from efficientvis.training import checkpoint
    from efficientvis.training.config import Config, ModelConfig
    from efficientvis.training.model import build_model
    from efficientvis.ytvis.synth import CATEGORIES, generate

    os.makedirs(folder, exist_ok=True)
    cfg = Config()
    cfg.name = "tiny-parity"
    cfg.model = dataclasses.replace(ModelConfig(), **TINY)
    cfg.data.test_size, cfg.data.max_size = SIZES["test_size"], SIZES["max_size"]
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for it in model.iterations:
            it.class_logits.bias.copy_(torch.linspace(*CLASS_BIAS, cfg.model.num_classes))
    ckpt = os.path.join(folder, "tiny.pt")
    checkpoint.save(ckpt, model=model.state_dict(), config=cfg.to_dict(),
                    class_names=[c["name"] for c in CATEGORIES])
    generate(os.path.join(folder, "data"), 0, frames=SYNTH["frames"], height=SYNTH["height"],
             width=SYNTH["width"], seed=SYNTH["seed"], valid_videos=SYNTH["videos"], workers=1)
    export_model(ckpt, os.path.join(folder, "model"), verify=False, log=lambda m: None)


@pytest.fixture(scope="session")
def tiny(request, tmp_path_factory):
    """{checkpoint, model_dir, data}: the shared tiny model, its export and a 2-video data folder."""
    from filelock import FileLock

    cache = getattr(request.config, "cache", None)
    root = str(cache.mkdir("efficientvis-tiny-export")) if cache is not None else \
        str(tmp_path_factory.mktemp("efficientvis-tiny-export"))
    key = _key()
    folder = os.path.join(root, key)
    with FileLock(os.path.join(root, key + ".lock")):
        done = os.path.join(folder, "model", "manifest.json")
        if not (os.path.isfile(done) and os.path.isfile(os.path.join(folder, "data", "valid", "annotations.json"))):
            shutil.rmtree(folder, ignore_errors=True)
            tmp = folder + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            _build(tmp)
            os.replace(tmp, folder)
        for old in os.listdir(root):  # earlier keys (changed sources) are not used again
            if old != key and not old.startswith(key) and not old.endswith(".lock"):
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return {"checkpoint": os.path.join(folder, "tiny.pt"), "model_dir": os.path.join(folder, "model"),
            "data": os.path.join(folder, "data", "valid")}


def _parity(tiny, tmp_path, *extra, name="parity.json"):
    out = str(tmp_path / name)
    rc = evis(["parity", "--checkpoint", tiny["checkpoint"], "--model", tiny["model_dir"], "--data", tiny["data"],
               "--threads", "1", "--json", out, *extra])
    with open(out) as f:
        return rc, json.load(f)


# ----------------------------------------------------------------------------------------------

def test_parity_fp32_passes_with_documented_json(tiny, tmp_path, capsys):
    rc, report = _parity(tiny, tmp_path)
    printed = capsys.readouterr().out
    assert rc == 0 and report["exit_code"] == 0 and report["passed"] is True, printed
    assert TOP_KEYS <= set(report)
    assert report["data"]["videos"] and report["data"]["clips_per_tensor"] == 2
    assert set(report["tolerances"]) == {"fp32", "fp16", "int8"}
    names = {b["name"]: b for b in report["backends"]}
    fp32 = names["ort-fp32"]
    assert BACKEND_KEYS <= set(fp32) and fp32["status"] == "passed"
    assert fp32["providers"] == ["CPUExecutionProvider"]
    per_graph = fp32["per_tensor"]["per_graph"]
    assert set(per_graph) == {"backbone", "stage_0", "stage_1", "mask_0", "mask_1"}
    assert set(per_graph["backbone"]) == {"p2", "p3", "p4", "p5"}
    assert set(per_graph["stage_1"]) == {"queries", "proposals", "class_logits", "attended", "next_queries"}
    assert set(per_graph["mask_1"]) == {"mask_probs"} and per_graph["mask_1"]["mask_probs"]["max_abs"] <= 1e-4
    for stats in list(per_graph["stage_0"].values()) + list(fp32["per_tensor"]["per_clip"].values()):
        assert STATS_KEYS <= set(stats) and stats["passed"]
    assert per_graph["stage_0"]["class_logits"]["max_abs"] <= 1e-4
    assert per_graph["stage_0"]["proposals"]["bound"] == pytest.approx(
        1e-5 * per_graph["stage_0"]["proposals"]["ref_max_abs"])  # relative bound for pixels
    e2e = fp32["end_to_end"]
    assert E2E_KEYS <= set(e2e)
    assert e2e["tracks"] == e2e["tracks_reference"] > 0  # the test model has tracks to compare
    assert e2e["mask_iou"] >= 0.99 and e2e["class_agreement"] == 1.0 and abs(e2e["delta_AP"]) <= 1e-3
    assert all(c["passed"] for c in fp32["checks"]) and len(fp32["checks"]) > 20
    assert {"check", "value", "limit", "op", "passed"} == set(fp32["checks"][0])
    # what this machine lacks is listed with the reason, not an error
    assert names["ort-int8"]["status"] == "skipped" and "--qdq" in names["ort-int8"]["reason"]
    assert names["trt"]["status"] == "skipped"
    assert "PASSED" in printed and "ort-fp32" in printed and "backbone/p2" in printed


def test_parity_fails_with_exit_1_when_a_tolerance_cannot_be_met(tiny, tmp_path, capsys):
    rc, report = _parity(tiny, tmp_path, "--videos", "1", "--clips", "1", "--tol-cosine", "1.5",
                         "--tol", "fp32.mask_iou=1.01")
    printed = capsys.readouterr().out
    assert rc == 1 and report["exit_code"] == 1 and report["passed"] is False
    fp32 = next(b for b in report["backends"] if b["name"] == "ort-fp32")
    assert fp32["status"] == "failed"
    failed = {c["check"] for c in fp32["checks"] if not c["passed"]}
    assert "per_graph.stage_0.class_logits.cosine" in failed and "end_to_end.mask_iou" in failed
    assert not any(c["check"].endswith("max_abs") for c in fp32["checks"] if not c["passed"])
    assert report["tolerances"]["fp32"]["cosine"] == 1.5 and report["tolerances"]["int8"]["cosine"] == 1.5
    assert report["tolerances"]["fp32"]["mask_iou"] == 1.01 and report["tolerances"]["int8"]["mask_iou"] == 0.9
    assert "FAILED" in printed and "end_to_end.mask_iou" in printed


def test_parity_qdq_folder_is_judged_as_int8(tiny, tmp_path):
    """A --qdq folder (here: the FP32 graphs under the Q/DQ file names, no manifest) runs as the
    INT8 backend with the INT8 tolerances (no absolute bounds, cosine >= 0.98)."""
    qdq = tmp_path / "qdq"
    qdq.mkdir()
    for name in ("backbone", "stage_0", "stage_1", "mask_0", "mask_1"):
        shutil.copy(os.path.join(tiny["model_dir"], f"{name}.onnx"), qdq / f"{name}.onnx")
    rc, report = _parity(tiny, tmp_path, "--qdq", str(qdq), "--backends", "ort-int8", "--videos", "1",
                         "--clips", "1")
    assert rc == 0, report["summary"]
    [int8] = report["backends"]
    assert (int8["name"], int8["precision"], int8["status"]) == ("ort-int8", "int8", "passed")
    stats = int8["per_tensor"]["per_graph"]["stage_0"]["class_logits"]
    assert "bound" not in stats and stats["cosine"] > 0.9999
    assert {c["check"].rsplit(".", 1)[-1] for c in int8["checks"]} >= {"cosine", "ap", "mask_iou"}


def test_parity_refuses_a_model_dir_of_another_checkpoint(tiny, tmp_path, capsys):
    from efficientvis.training import checkpoint
    from efficientvis.training.infer import load_model

    model, cfg, names = load_model(tiny["checkpoint"], "cpu")
    with torch.no_grad():
        model.init_queries.weight.add_(0.5)
    other = str(tmp_path / "other.pt")
    checkpoint.save(other, model=model.state_dict(), config=cfg.to_dict(), class_names=names)
    rc = evis(["parity", "--checkpoint", other, "--model", tiny["model_dir"], "--data", tiny["data"]])
    err = capsys.readouterr().err
    assert rc == 1 and "is not an export of" in err and "q*" in err
    # same weights, but trained to carry proposals: the export's runtime would not carry them
    model, cfg, names = load_model(tiny["checkpoint"], "cpu")
    cfg.model.carry_proposals = True
    checkpoint.save(other, model=model.state_dict(), config=cfg.to_dict(), class_names=names)
    rc = evis(["parity", "--checkpoint", other, "--model", tiny["model_dir"], "--data", tiny["data"]])
    err = capsys.readouterr().err
    assert rc == 1 and "is not an export of" in err and "carry_threshold 0.2 vs None" in err


def test_tolerance_flags():
    import argparse

    from efficientvis.errors import UserError
    from efficientvis.export import parity

    p = argparse.ArgumentParser()
    parity.add_arguments(p)
    base = ["--checkpoint", "c", "--model", "m", "--data", "d"]
    tol = parity.tolerances_from_args(p.parse_args(base + ["--tol-ap", "none", "--tol", "int8.ap=0.02",
                                                           "--tol", "fp16.logits-abs=0.1"]))
    assert tol["fp32"]["ap"] is None and tol["int8"]["ap"] == 0.02 and tol["fp16"]["logits_abs"] == 0.1
    assert tol["fp32"]["logits_abs"] == 1e-4 and tol["fp32"]["mask_iou"] == 0.99
    with pytest.raises(UserError):
        parity.tolerances_from_args(p.parse_args(base + ["--tol", "fp64.ap=1"]))
    # the per-tensor rule: bound = KIND_abs + KIND_rel * max|ref|; proposals (pixels) relative only
    def ok(name, ref, err, chained=False):
        ref = np.asarray(ref, np.float64)
        stats = parity.tensor_stats(ref + np.array([0, 0, err]), ref)
        return parity.judge_tensor(stats, name, parity.TOLERANCES["fp32"], chained)[0][4]

    assert ok("proposals", [100.0, 200.0, 300.0], 2e-3) and not ok("proposals", [100.0, 200.0, 300.0], 4e-3)
    assert ok("class_logits", [1.0, 2.0, 3.0], 1e-4) and not ok("class_logits", [1.0, 2.0, 3.0], 2e-4)
    assert not ok("proposals", [1.0, 2.0, 3.0], 1e-4)  # no absolute slack for pixel coordinates
    # mask probabilities: 1e-4 per graph, 1e-3 for a whole clip chained inside the backend
    assert not ok("mask_probs", [0.1, 0.5, 0.9], 2e-4) and ok("mask_probs", [0.1, 0.5, 0.9], 2e-4, chained=True)
    assert not ok("mask_probs", [0.1, 0.5, 0.9], 2e-3, chained=True)


def test_evis_run_dataset_gives_the_results_file_of_evis_infer(tiny, tmp_path, capsys):
    """`evis run --dataset` (ONNX Runtime, torch-free loop) writes the results file `evis infer`
    (PyTorch) writes, within the FP32 end-to-end tolerances; a results file missing a track fails."""
    data = tiny["data"]
    ref, run_dir, report = str(tmp_path / "infer.json"), str(tmp_path / "run"), str(tmp_path / "files.json")
    assert evis(["infer", "--checkpoint", tiny["checkpoint"], "--data", os.path.join(data, "JPEGImages"),
                 "--ann", os.path.join(data, "annotations.json"), "--out", ref, "--threads", "1"]) == 0
    assert evis(["run", "--model", tiny["model_dir"], "--dataset", data, "--out", run_dir, "--threads", "1"]) == 0
    got = os.path.join(run_dir, "results.json")
    with open(got) as f:
        results = json.load(f)
    assert {r["video_id"] for r in results} == {v["id"] for v in json.load(open(os.path.join(data, "annotations.json")))["videos"]}

    assert evis(["parity", "--results", got, "--reference", ref, "--data", data, "--json", report]) == 0
    with open(report) as f:
        files = json.load(f)
    e2e = files["backends"][0]["end_to_end"]
    assert files["passed"] and e2e["tracks"] == e2e["tracks_reference"] > 0
    assert e2e["class_agreement"] == 1.0 and e2e["mask_iou"] >= 0.99 and abs(e2e["delta_AP"]) <= 1e-3

    # infer.duplicate_iou / --duplicate-iou: the same fewer tracks in both (the slots of this
    # random model overlap)
    dedup_ref, dedup_dir = str(tmp_path / "infer_dedup.json"), str(tmp_path / "run_dedup")
    assert evis(["infer", "--checkpoint", tiny["checkpoint"], "--data", os.path.join(data, "JPEGImages"),
                 "--ann", os.path.join(data, "annotations.json"), "--out", dedup_ref, "--threads", "1",
                 "--set", "infer.duplicate_iou=0.3"]) == 0
    assert evis(["run", "--model", tiny["model_dir"], "--dataset", data, "--out", dedup_dir, "--threads", "1",
                 "--duplicate-iou", "0.3"]) == 0
    assert evis(["parity", "--results", os.path.join(dedup_dir, "results.json"), "--reference", dedup_ref,
                 "--data", data, "--json", report]) == 0
    with open(report) as f:
        dedup = json.load(f)["backends"][0]["end_to_end"]
    assert 0 < dedup["tracks"] == dedup["tracks_reference"] < e2e["tracks"]

    # drop every entry of one track (its top-k entries share the masks): track_count breaks
    first = results[0]["segmentations"]
    broken = [r for r in results if not (r["video_id"] == results[0]["video_id"] and r["segmentations"] == first)]
    bad = str(tmp_path / "broken.json")
    with open(bad, "w") as f:
        json.dump(broken, f)
    capsys.readouterr()
    assert evis(["parity", "--results", bad, "--reference", ref, "--data", data]) == 1
    assert "end_to_end.track_count" in capsys.readouterr().out

    # annotations whose categories are not the model's classes: one line naming the file, exit 1
    renamed = json.load(open(os.path.join(data, "annotations.json")))
    renamed["categories"][0]["name"] = "blob"
    other_ann = str(tmp_path / "renamed.json")
    with open(other_ann, "w") as f:
        json.dump(renamed, f)
    capsys.readouterr()
    assert evis(["run", "--model", tiny["model_dir"], "--dataset", data, "--ann", other_ann, "--out", run_dir]) == 1
    err = capsys.readouterr().err
    assert "renamed.json: categories" in err and "differ from the model's classes" in err

    # neither --source nor --dataset: one line, exit 1
    assert evis(["run", "--model", tiny["model_dir"], "--out", run_dir]) == 1
    assert "exactly one of --source SPEC or --dataset DIR" in capsys.readouterr().err
