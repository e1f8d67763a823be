"""Ceiling of ONNX Runtime CPU INT8 speed-up on this machine: two 3x3 convs, 256 -> 256 channels on
9 frames of 90x160 (the r50_ytvis19 FPN's stride-4 map at 360x640, T = 9), FP32 vs Q/DQ INT8 with
symmetric int8 activations (S8S8, what TensorRT needs and `evis calibrate` writes) and with
asymmetric uint8 activations (U8S8, ONNX Runtime's preferred form on x86).

    python benchmarks/int8_conv_ceiling.py [--threads 2] [--work DIR]

Prints ms per run and the ops ONNX Runtime runs after its graph fusions (QLinearConv = fused).
"""
import argparse
import os
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

rng = np.random.default_rng(0)
B, C, H, W = 9, 256, 90, 160
def model(path):
    w1 = numpy_helper.from_array((rng.standard_normal((C, C, 3, 3)) * 0.02).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((C, C, 3, 3)) * 0.02).astype(np.float32), "w2")
    n1 = helper.make_node("Conv", ["x", "w1"], ["y1"], pads=[1,1,1,1])
    r1 = helper.make_node("Relu", ["y1"], ["z1"])
    n2 = helper.make_node("Conv", ["z1", "w2"], ["y2"], pads=[1,1,1,1])
    r2 = helper.make_node("Relu", ["y2"], ["z2"])
    g = helper.make_graph([n1, r1, n2, r2], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, C, H, W])],
                          [helper.make_tensor_value_info("z2", TensorProto.FLOAT, [B, C, H, W])], [w1, w2])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
class R(CalibrationDataReader):
    def __init__(self): self.d = iter([{"x": np.abs(rng.standard_normal((B, C, H, W))).astype(np.float32)}])
    def get_next(self): return next(self.d, None)
p = argparse.ArgumentParser(description="ONNX Runtime CPU INT8 conv speed-up ceiling")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "evis_int8_ceiling"))
args = p.parse_args()
os.makedirs(args.work, exist_ok=True)
D = args.work
model(f"{D}/fp32.onnx")
for name, act, sym in [("s8s8", QuantType.QInt8, True), ("u8s8", QuantType.QUInt8, False)]:
    quantize_static(f"{D}/fp32.onnx", f"{D}/{name}.onnx", R(), quant_format=QuantFormat.QDQ,
                    activation_type=act, weight_type=QuantType.QInt8, per_channel=True,
                    extra_options={"ActivationSymmetric": sym, "WeightSymmetric": True})
x = np.abs(rng.standard_normal((B, C, H, W))).astype(np.float32)
base = None
for name in ["fp32", "s8s8", "u8s8"]:
    so = ort.SessionOptions(); so.intra_op_num_threads = args.threads
    so.optimized_model_filepath = f"{D}/{name}.opt.onnx"
    s = ort.InferenceSession(f"{D}/{name}.onnx", so, providers=["CPUExecutionProvider"])
    s.run(None, {"x": x})
    t0 = time.perf_counter()
    for _ in range(3): s.run(None, {"x": x})
    ops = [n.op_type for n in onnx.load(f"{D}/{name}.opt.onnx").graph.node]
    ms = (time.perf_counter() - t0) / 3 * 1000
    base = base if name != "fp32" else ms
    print(f"{name}: {ms:.0f} ms ({base / ms:.2f}x of fp32), ops after fusion: {', '.join(sorted(set(ops)))}")
