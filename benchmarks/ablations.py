"""The paper's Table 1 directions on the synthetic data, each with the `make train-tiny` schedule.

    python benchmarks/ablations.py --data data/synth --out work_dirs/ablations [--variants ...]
        [--steps N] [--set SECTION.KEY=VALUE ...] [--baseline models/tiny/tiny.pt]

Every variant trains for the same number of steps (default: the steps of the --baseline checkpoint,
or of the committed models/tiny/tiny.pt, what `make train-tiny` ran), like the paper's equal-epoch
comparisons; equal steps also keep the result independent of the machine's load (the tiny config's
train.budget_minutes, which fits the length to the machine's speed, is switched off). --set changes
every variant (e.g. the session-5 table: --steps 946 --set loss.class_loss=focal
--set "train.lr_drop_epochs=[8]"). --baseline CKPT evaluates a checkpoint trained with that
schedule instead of training the baseline again.

Variants (each a full `evis train --config tiny` run with one change):
  baseline      factorised attention, temporal dynamic conv, correspondence learning
  no_cl         data.correspondence=off                     (Table 1e)
  no_cl_4clips  no_cl with 4 single clips per step: as many clips as the baseline's 2 pairs
  spatial       model.attention=spatial                     (Table 1a)
and for the baseline checkpoint two inference schemes: end-to-end query feedback vs hand-crafted
linking (Table 1d). Writes OUT/ablations.json and prints a markdown table for docs/ablations.md.
A finished variant (its final.pt exists) is not trained again.
"""

import argparse
import json
import os
import subprocess
import sys

VARIANTS = {
    "baseline": [],
    "no_cl": ["data.correspondence=off"],
    # the same clips per step as the baseline's pairs (B = 2 pairs = 4 clips), steps per epoch kept
    "no_cl_4clips": ["data.correspondence=off", "train.batch_size=4", "train.samples_per_epoch=400"],
    "spatial": ["model.attention=spatial"],
}


def evis(*args):
    cmd = [sys.executable, "-m", "efficientvis", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def evaluate(ckpt, data, out_json, *settings):
    results = out_json.replace(".json", "_results.json")
    sets = [x for s in settings for x in ("--set", s)]
    evis("infer", "--checkpoint", ckpt, "--data", os.path.join(data, "valid", "JPEGImages"),
         "--ann", os.path.join(data, "valid", "annotations.json"), "--out", results, *sets)
    evis("eval", "--gt", os.path.join(data, "valid", "annotations.json"), "--results", results,
         "--json", out_json)
    with open(out_json) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/synth")
    p.add_argument("--out", default="work_dirs/ablations")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=0,
                   help="training steps of every variant (0: those of --baseline or models/tiny/tiny.pt)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config override applied to every variant (repeatable)")
    p.add_argument("--baseline", help="a baseline checkpoint trained with this schedule (skips training it)")
    args = p.parse_args()
    if not args.steps:
        from efficientvis.errors import UserError
        from efficientvis.training import checkpoint
        try:
            args.steps = int(checkpoint.load(args.baseline or "models/tiny/tiny.pt")["step"])
        except UserError as e:
            sys.exit(f"ablations.py: {e} (give --steps N)")
    summary = os.path.join(args.out, "ablations.json")
    rows = {}
    if os.path.isfile(summary):  # variants run before (e.g. one at a time with --variants) are kept
        with open(summary) as f:
            rows = json.load(f)
    for name in args.variants:
        work = os.path.join(args.out, name)
        ckpt = os.path.join(work, "final.pt")
        if name == "baseline" and args.baseline:
            ckpt = args.baseline
        elif not os.path.exists(ckpt):
            # a fixed length: max_steps, not the budget, and enough epochs that they do not cap it
            schedule = ["train.eval_every=0", "train.max_minutes=0", "train.budget_minutes=0",
                        f"train.max_steps={args.steps}", "train.epochs=1000"]
            sets = [x for s in args.set + VARIANTS[name] + schedule for x in ("--set", s)]
            evis("train", "--config", "tiny", "--data", args.data, "--out", work, *sets)
        rows[name] = evaluate(ckpt, args.data, os.path.join(work, "metrics_e2e.json"))
        if name == "baseline":
            rows["handcrafted"] = evaluate(ckpt, args.data, os.path.join(work, "metrics_handcrafted.json"),
                                           "infer.linking=handcrafted")
    with open(summary, "w") as f:
        json.dump(rows, f, indent=2)
    print("| variant | AP | AP50 | AP75 | AR1 | AR10 |\n|---|---|---|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * m[k]:.1f}" for k in ("AP", "AP50", "AP75", "AR1", "AR10")) + " |")


if __name__ == "__main__":
    main()
