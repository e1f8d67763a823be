"""TensorRT calibration caches (implicit INT8, TensorRT <= 10) from the Q/DQ models' scales.

TensorRT's calibration cache is text: a header line `TRT-<version>-<algorithm>` and one line per
tensor `<tensor name>: <scale>`, the scale (dynamic range / 127) written as the 8 hex digits of
its IEEE-754 float32 bit pattern, most significant byte first (e.g. `data: 3c008912` = 0.00784).
`<version>` is TensorRT's NV_TENSORRT_VERSION: major*1000 + minor*100 + patch before 10
(`TRT-8601-...` for 8.6.1), major*10000 + minor*100 + patch from 10 on (`TRT-100300-...` for
10.3.0). TensorRT compares the header with its own version and the calibrator's algorithm and
recalibrates on a mismatch, so the cache is written for one TensorRT version
(`evis calibrate --cache-trt-version`, default the installed tensorrt, else 10.3.0 = JetPack 6) and
algorithm (EntropyCalibration2 unless --cache-algorithm says otherwise; it must match the user's
calibrator class, e.g. IInt8EntropyCalibrator2).

The cache lists exactly the activations the Q/DQ model quantizes (tensor names of the FP32 ONNX,
which TensorRT's parser keeps), with the same scales: layers whose tensors have no scale run in
FP16/FP32, which is what the exclusions ask for. Implicit INT8 calibration is deprecated since
TensorRT 10.1 and removed in 11: the Q/DQ models are the path on every version.
"""

from __future__ import annotations

import re
import struct

from efficientvis.errors import UserError

ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
DEFAULT_ALGORITHM = "EntropyCalibration2"
DEFAULT_TRT_VERSION = "10.3.0"  # JetPack 6
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")


def version_number(version: str) -> int:
    """'10.3.0' -> 100300, '8.6.1' -> 8601 (TensorRT's NV_TENSORRT_VERSION)."""
    m = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if not m:
        raise UserError(f"not a TensorRT version: {version!r} (expected e.g. 10.3.0)")
    major, minor, patch = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def header(version: str, algorithm: str = DEFAULT_ALGORITHM) -> str:
    if algorithm not in ALGORITHMS:
        raise UserError(f"calibration cache algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    return f"TRT-{version_number(version)}-{algorithm}"


def encode_scale(scale: float) -> str:
    """float32 scale -> 8 hex digits of its big-endian bit pattern."""
    return struct.pack(">f", float(scale)).hex()


def decode_scale(text: str) -> float:
    if not re.fullmatch(r"[0-9a-fA-F]{1,8}", text):
        raise ValueError(f"not a hex float32: {text!r}")
    return struct.unpack(">f", bytes.fromhex(text.zfill(8)))[0]


def format_cache(scales: dict, version: str = DEFAULT_TRT_VERSION, algorithm: str = DEFAULT_ALGORITHM) -> str:
    lines = [header(version, algorithm)]
    for name, scale in scales.items():
        if "\n" in name or not (scale > 0):
            raise ValueError(f"cannot write tensor {name!r} with scale {scale}")
        lines.append(f"{name}: {encode_scale(scale)}")
    return "\n".join(lines) + "\n"


def write_cache(path: str, scales: dict, version: str = DEFAULT_TRT_VERSION,
                algorithm: str = DEFAULT_ALGORITHM) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(format_cache(scales, version, algorithm))
    return path


def parse_cache(text: str) -> tuple:
    """-> (header line, {tensor name: scale}); ValueError on a malformed cache."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not _HEADER.match(lines[0].strip()):
        raise ValueError("first line is not a TRT-<version>-<algorithm> header")
    scales = {}
    for ln in lines[1:]:
        name, sep, value = ln.rpartition(": ")
        if not sep or not name:
            raise ValueError(f"malformed line {ln!r}")
        if name in scales:
            raise ValueError(f"tensor {name!r} listed twice")
        scales[name] = decode_scale(value.strip())
    return lines[0].strip(), scales


def read_cache(path: str) -> tuple:
    with open(path, encoding="utf-8") as f:
        return parse_cache(f.read())


def installed_tensorrt_version():
    """The tensorrt Python package's version, or None where it is not installed."""
    try:
        import tensorrt
    except Exception:  # noqa: BLE001 - ImportError, or a broken install (missing libnvinfer)
        return None
    return getattr(tensorrt, "__version__", None)
