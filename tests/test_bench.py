"""evis bench on the tiny model of test_parity.py (1 warm-up + 2 timed clips, a T sweep): JSON with
the documented fields and a PNG; the random-weight model cache; the analytic FLOP counter against
hand computations on one-node graphs."""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")

from onnx import TensorProto, helper  # noqa: E402

from efficientvis.cli import main as evis  # noqa: E402
from efficientvis.export import flops  # noqa: E402
from test_parity import tiny  # noqa: E402,F401 - the shared tiny export (fixture)

STAT_KEYS = {"mean", "p50", "p90", "p99", "min"}
BACKEND_KEYS = {"name", "runtime", "precision", "provider", "threads", "status", "reason", "latency_ms",
                "per_frame_ms", "fps", "gflops_per_s", "matmul_rate_share", "peak_rss_mb", "rss_increase_mb",
                "process_peak_rss_mb",
                "speedup_vs_pytorch", "instances_per_clip", "stages_sweep", "input_size"}


def test_bench_json_and_plot(tiny, tmp_path, capsys):
    out, png = str(tmp_path / "bench.json"), str(tmp_path / "bench.png")
    rc = evis(["bench", "--checkpoint", tiny["checkpoint"], "--model", tiny["model_dir"], "--threads", "1",
               "--warmup", "1", "--iters", "2", "--sweep-T", "1,4", "--json", out, "--plot", png])
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0, printed
    with open(out) as f:
        r = json.load(f)
    # round robin (the default): both loaded first, then one clip of each in turn
    assert r["settings"]["order"] == "round-robin" and "one clip of each backend in turn" in printed
    log = captured.err
    assert log.index("warming up pytorch") < log.index("warming up ort-fp32") < log.index("one clip each in turn")
    assert {"command", "format_version", "created", "machine", "model", "settings", "flops", "parts", "backends",
            "sweeps", "ratios", "targets", "plot", "seconds"} <= set(r)
    assert r["machine"]["threads"] == 1 and r["machine"]["matmul_gflops"]["value"] > 0
    assert r["settings"]["size"] == [64, 112] and r["settings"]["clip"] == 4 and r["settings"]["stages"] == 2
    assert r["settings"]["warmup"] == 1 and r["settings"]["iters"] == 2
    ok = {b["name"]: b for b in r["backends"] if b["status"] == "ok"}
    assert {"pytorch", "ort-fp32"} <= set(ok)
    for b in ok.values():
        assert BACKEND_KEYS <= set(b)
        for part in ("preprocess", "backbone", "stage_0", "stage_1", "mask_head", "postprocess", "model", "clip"):
            assert STAT_KEYS == set(b["latency_ms"][part]) and b["latency_ms"][part]["mean"] > 0
        lat = b["latency_ms"]
        assert lat["clip"]["mean"] >= lat["model"]["mean"] >= lat["backbone"]["mean"]
        assert b["fps"]["model"] == pytest.approx(4000 / lat["model"]["mean"])
        assert b["per_frame_ms"]["clip"] == pytest.approx(lat["clip"]["mean"] / 4)
        assert b["peak_rss_mb"] is None and b["rss_increase_mb"] is not None
        assert b["process_peak_rss_mb"] > 0 and [s["stages"] for s in b["stages_sweep"]] == [1, 2]
        assert b["instances_per_clip"] > 0  # raised class biases: postprocess pastes masks
    assert ok["pytorch"]["speedup_vs_pytorch"]["model"] == pytest.approx(1.0)
    assert ok["ort-fp32"]["provider"] == "CPU"
    assert "ort-fp32 / pytorch" in r["ratios"]
    # round robin: one paired ratio per round, from the clips' own times
    paired = r["ratios_per_round"]["ort-fp32 / pytorch"]
    pt, ort_ms = (np.array(ok[n]["model_ms_per_clip"]) for n in ("pytorch", "ort-fp32"))
    assert len(pt) == len(ort_ms) == 2 and np.allclose(paired["values"], pt / ort_ms, rtol=1e-3)
    assert paired["min"] <= paired["median"] <= paired["max"] and "ratios per round" in printed
    skipped = {b["name"]: b["reason"] for b in r["backends"] if b["status"] == "skipped"}
    assert "ort-int8" in skipped and "--qdq" in skipped["ort-int8"]
    # work: the ONNX count at the benchmark's shapes, cross-checked by FlopCounterMode
    f = r["flops"]
    count = flops.model_dir_flops(tiny["model_dir"], 4, 64, 112)
    assert f["per_clip"] == count["total"] > 0 and f["unresolved_nodes"] == 0
    assert f["torch_flop_counter"] == pytest.approx(f["per_clip"], rel=0.02)
    assert [(row["backend"], row["T"]) for row in r["sweeps"]["T"]] == \
        [("pytorch", 1), ("pytorch", 4), ("ort-fp32", 1), ("ort-fp32", 4)]
    assert {t["name"].split(" vs ")[0] for t in r["targets"]} == {"ort-fp32", "ort-int8"}
    # the 1.5x / 2x targets are stated for r50 at 360x640, T=9: a tiny run says it is not that size
    assert not any(t["at_target_size"] for t in r["targets"]) and "not that size" in printed
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 20000
    assert r["plot"] == png and "ort-fp32" in printed and "GFLOP/s" in printed


def test_random_weights_model_is_cached_by_config(tiny, tmp_path, capsys):
    """--random-weights --config: the model lives under the cache folder keyed by the config; a
    cached folder is used as it is (no second export)."""
    import yaml

    from efficientvis.export import bench
    from efficientvis.training import checkpoint
    from efficientvis.training.config import load_config

    cfg_dict = checkpoint.config_of(checkpoint.load(tiny["checkpoint"]), tiny["checkpoint"]).to_dict()
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(str(path))
    key = bench.random_weights_key(cfg)
    other = load_config(str(path), ["infer.top_k=3"])
    assert key == bench.random_weights_key(load_config(str(path))) != bench.random_weights_key(other)
    cache = tmp_path / "cache"
    (cache / key).mkdir(parents=True)
    shutil.copy(tiny["checkpoint"], cache / key / "checkpoint.pt")
    shutil.copytree(tiny["model_dir"], cache / key / "model")
    out = str(tmp_path / "rw.json")
    rc = evis(["bench", "--config", str(path), "--random-weights", "--cache-dir", str(cache), "--threads", "1",
               "--backends", "ort-fp32", "--warmup", "0", "--iters", "1", "--sequential", "--json", out])
    captured = capsys.readouterr()
    assert rc == 0 and "using the cached export" in captured.err
    with open(out) as f:
        r = json.load(f)
    assert r["model"]["source"] == "random-weights" and r["model"]["model_dir"] == str(cache / key / "model")
    assert [b["name"] for b in r["backends"]] == ["ort-fp32"]
    assert r["settings"]["order"] == "sequential" and r["backends"][0]["peak_rss_mb"] > 0
    # bad input is one line and exit 1
    rc = evis(["bench", "--checkpoint", tiny["checkpoint"], "--model", tiny["model_dir"], "--clip", "9"])
    assert rc == 1 and "--clip must be 1..4" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the analytic FLOP counter

def _value(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _weight(name, shape):
    return helper.make_tensor(name, TensorProto.FLOAT, shape, np.zeros(int(np.prod(shape)), np.float32))


def test_flop_counter_matches_hand_computation():
    # Conv 3 -> 4 channels, 3x3, pad 1 on N x 3 x H x W (dynamic N, H, W); grouped strided conv;
    # a batched MatMul against a 2-D weight; a Gemm with transB
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Conv", ["x4", "w2"], ["y2"], pads=[1, 1, 1, 1], strides=[2, 2], group=2,
                         kernel_shape=[3, 3]),
        helper.make_node("MatMul", ["a", "b"], ["y3"]),
        helper.make_node("Gemm", ["g", "gw"], ["y4"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "flops",
        [_value("x", ["N", 3, "H", "W"]), _value("x4", [1, 4, 9, 9]), _value("a", ["B", 5, 6]), _value("g", [3, 8])],
        [_value("y1", None), _value("y2", None), _value("y3", None), _value("y4", None)],
        [_weight("w1", [4, 3, 3, 3]), _weight("w2", [8, 2, 3, 3]), _weight("b", [6, 7]), _weight("gw", [5, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    r = flops.graph_flops(model, {"x": (2, 3, 8, 10), "a": (2, 5, 6)})
    conv = 2 * (2 * 4 * 8 * 10) * (3 * 3 * 3)  # 2 x outputs x (C_in/group x k x k)
    grouped = 2 * (1 * 8 * 5 * 5) * (2 * 3 * 3)  # stride 2: 9 -> 5
    matmul = 2 * (2 * 5 * 7) * 6
    gemm = 2 * 3 * 5 * 8
    assert r["by_op"] == {"Conv": conv + grouped, "MatMul": matmul, "Gemm": gemm}
    assert r["flops"] == conv + grouped + matmul + gemm == 34560 + 7200 + 840 + 240
    assert r["counted_nodes"] == 4 and r["unresolved"] == []
    # without the dynamic sizes the nodes that need them are reported, not guessed
    r = flops.graph_flops(model, {})
    assert r["by_op"] == {"Conv": grouped, "Gemm": gemm} and len(r["unresolved"]) == 2


def test_pytorch_fp16_runner_is_autocast_and_close_to_fp32():
    """The pytorch-cuda-fp16 row's runner (autocast float16, as AMP training), run here with CPU
    autocast: float32 outputs to the caller, float32 queries carried, values near the FP32 run."""
    from efficientvis.export.bench import TorchRunner
    from efficientvis.training.config import load_config
    from efficientvis.training.model import build_model

    torch.manual_seed(0)
    # learned initial boxes: an untrained dense head's near-tied peaks would pick other slots' boxes
    # in float16 (a discrete choice, not a rounding error)
    model = build_model(load_config("tiny", ["model.init_boxes=image"]).model).eval()
    frames = np.random.default_rng(0).integers(0, 255, (3, 3, 64, 96), dtype=np.uint8)
    outs = {}
    for fp16 in (False, True):
        runner = TorchRunner(model, "cpu", fp16=fp16)
        runner.start()
        outs[fp16], _ = runner.run(frames, 3)
        assert runner.queries.dtype == torch.float32
    for name, ref in outs[False].items():
        assert outs[True][name].dtype == np.float32
        assert np.abs(outs[True][name] - ref).max() <= 0.02 * max(1.0, np.abs(ref).max()), name
    assert not np.array_equal(outs[True]["class_logits"], outs[False]["class_logits"])  # it did run in fp16
