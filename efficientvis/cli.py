"""`evis` command line: one entry point, one sub-command per module.

Each sub-command lives in the module that owns the work and provides `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their command runs, so `evis run` never imports
torch.
"""

import argparse
import importlib
import sys

from efficientvis import __version__
from efficientvis.errors import UserError, one_line

# name -> (module, one-line help)
COMMANDS = {
    "synth": ("efficientvis.ytvis.synth", "generate a synthetic YouTube-VIS dataset"),
    "eval": ("efficientvis.ytvis.metric", "YouTube-VIS metric of a results file"),
    "train": ("efficientvis.training.train", "train EfficientVIS"),
    "infer": ("efficientvis.training.infer", "PyTorch inference to a YouTube-VIS results file"),
    "export": ("efficientvis.export.export", "export a checkpoint to ONNX graphs + manifest"),
    "check": ("efficientvis.export.trt_check", "check ONNX graphs against TensorRT's ONNX parser"),
    "calibrate": ("efficientvis.calibration.calibrate", "INT8 calibration: Q/DQ models and caches"),
    "build": ("efficientvis.export.engine", "build TensorRT engines from an exported model"),
    "run": ("efficientvis.runtime.run", "run an exported model on a video, folder, camera or stream"),
    "parity": ("efficientvis.export.parity", "compare PyTorch with every available backend"),
    "bench": ("efficientvis.export.bench", "latency/FPS benchmark of every available backend"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evis", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"evis {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help / version / the unknown-command error
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("efficientvis"):
            raise
        print(f"evis {name}: error: needs the Python package '{e.name}' "
              f"(install the matching extra, see README)", file=sys.stderr)
        return 1
    sub = argparse.ArgumentParser(prog=f"evis {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"evis {name}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"evis {name}: interrupted", file=sys.stderr)
        return 130
