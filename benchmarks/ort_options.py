"""Why is ONNX Runtime as fast (or slow) as it is here? One graph of an exported MODEL_DIR under
several ONNX Runtime session options and PyTorch eager variants on the same input, timed
round-robin (variant 1, 2, ..., 1, 2, ...) so that a busy machine's load drift hits every variant
alike. Not a test.

    .venv/bin/python benchmarks/ort_options.py --model MODEL_DIR --checkpoint CKPT [--graph backbone]
        [--size 360x640] [--clip 3] [--threads 2] [--rounds 3] [--variants a,b,...] [--json out.json]

Variants (ONNX Runtime: intra_op_num_threads = --threads and spinning off unless said otherwise):
  ort              OrtBackend's options (intra = threads, inter = 1, ORT_ENABLE_ALL, CPU arena on,
                   spinning off)
  ort-extended     graph_optimization_level ORT_ENABLE_EXTENDED
  ort-basic        graph_optimization_level ORT_ENABLE_BASIC
  ort-noopt        graph_optimization_level ORT_DISABLE_ALL
  ort-noarena      enable_cpu_mem_arena False
  ort-parallel     execution_mode ORT_PARALLEL, inter_op_num_threads 2
  ort-spin         session.intra_op.allow_spinning 1 (ONNX Runtime's default; OrtBackend turns it off:
                   the threads of one session spin on the cores the next one needs)
  ort-1thread      intra_op_num_threads 1
  ort-default-threads  intra_op_num_threads 0 (ORT's own choice)
  torch            PyTorch eager, the graph's module (export/graphs.py), torch.set_num_threads(threads)
  torch-cl         the same with the model in channels_last
"""

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

ORT_VARIANTS = {
    "ort": {},
    "ort-extended": {"level": "ORT_ENABLE_EXTENDED"},
    "ort-basic": {"level": "ORT_ENABLE_BASIC"},
    "ort-noopt": {"level": "ORT_DISABLE_ALL"},
    "ort-noarena": {"arena": False},
    "ort-parallel": {"parallel": True},
    "ort-spin": {"spin": "1"},
    "ort-1thread": {"threads": 1},
    "ort-default-threads": {"threads": 0},
}


def ort_session(path, threads, level=None, arena=True, parallel=False, spin=None):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.log_severity_level = 3
    if threads:
        o.intra_op_num_threads = threads
        o.inter_op_num_threads = 1
    if level:
        o.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    o.enable_cpu_mem_arena = arena
    if parallel:
        o.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        o.inter_op_num_threads = 2
    if spin is not None:
        o.add_session_config_entry("session.intra_op.allow_spinning", spin)
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def main(argv=None):
    import torch

    from efficientvis.export import graphs as G
    from efficientvis.export.bench import parse_size
    from efficientvis.export.export import clip_start, torch_reference
    from efficientvis.runtime import manifest as manifest_lib
    from efficientvis.training.infer import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--graph", default="backbone", help="backbone | stage_k | mask_k | model")
    p.add_argument("--size", default="360x640")
    p.add_argument("--clip", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=",".join(list(ORT_VARIANTS) + ["torch", "torch-cl"]))
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    H, W = parse_size(args.size)
    m = manifest_lib.load(args.model, verify=False)
    model, cfg, _ = load_model(args.checkpoint, "cpu")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (args.clip, 3, H, W), dtype=np.uint8)
    index = args.graph.split("_")[-1]
    _, feeds = torch_reference(model, frames, clip_start(m.initial_queries, frames), m.data.get("roi_align", "roialign"),
                               num_stages=int(index) + 1 if index.isdigit() else None)
    feed = feeds[args.graph]
    path = m.path(args.graph)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    runs = {}
    for v in variants:
        if v in ORT_VARIANTS:
            kw = {"spin": "0", **ORT_VARIANTS[v]}  # OrtBackend's, unless the variant says otherwise
            threads = kw.pop("threads", args.threads)
            s = ort_session(path, threads, **kw)
            names = {i.name for i in s.get_inputs()}
            f = {k: x for k, x in feed.items() if k in names}
            runs[v] = (lambda s=s, f=f: s.run(None, f))
        elif v in ("torch", "torch-cl"):
            mod = model if v == "torch" else copy.deepcopy(model).to(memory_format=torch.channels_last)
            if args.graph == "model":
                x = torch.from_numpy(frames)[None]
                q = torch.from_numpy(m.initial_queries)[None]

                def call(mod=mod, x=x, q=q):
                    with torch.no_grad():
                        return mod(x, init_queries=q)
            else:
                module = G.build_graph_module(mod, args.graph)
                inputs = [torch.from_numpy(np.asarray(feed[n])) for n in G.graph_io_names(args.graph)[0]]

                def call(module=module, inputs=inputs):
                    with torch.no_grad():
                        return module(*inputs)
            runs[v] = call
        else:
            raise SystemExit(f"unknown variant {v}")
    times = {v: [] for v in runs}
    for v, fn in runs.items():  # warm-up
        fn()
    for r in range(args.rounds):
        for v, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[v].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v} {1000 * times[v][-1]:.0f}" for v in runs),
              file=sys.stderr, flush=True)
    base = np.median(times.get("ort", next(iter(times.values()))))
    print(f"{args.graph} at T={args.clip}, {H}x{W}, {args.threads} threads, {args.rounds} rounds "
          f"(round-robin), load average {os.getloadavg()[0]:.2f}")
    print(f"{'variant':<22} {'median ms':>10} {'min ms':>10} {'vs ort':>8}")
    rows = []
    for v, ts in times.items():
        med = float(np.median(ts))
        rows.append({"variant": v, "median_ms": 1000 * med, "min_ms": 1000 * float(min(ts)),
                     "relative_to_ort": med / base})
        print(f"{v:<22} {1000 * med:>10.1f} {1000 * min(ts):>10.1f} {med / base:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"graph": args.graph, "T": args.clip, "H": H, "W": W, "threads": args.threads,
                       "rounds": args.rounds, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
