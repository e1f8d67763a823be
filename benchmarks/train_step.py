"""Seconds per training step of a config, and where they go (torch.profiler's top operators).

    python benchmarks/train_step.py --config tiny --data data/synth [--steps 20] [--profile 4]

Runs the step `evis train` runs (TrainStep: lead clips, the trained chain, loss, backward, AdamW)
on the first samples of the train split, with the batches loaded beforehand so the figure is the
model's, not the data loader's. The first `--warmup` steps are not counted. Use it to see whether
a change to the model or the config makes a step cheaper before spending a training run on it.
"""

import argparse
import time

import torch

from efficientvis.training import train
from efficientvis.training.config import load_config
from efficientvis.training.dataset import collate
from efficientvis.training.losses import TrackletCriterion
from efficientvis.training.model import build_model
from efficientvis.ytvis import format as ytvis_format


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--data", required=True, help="dataset root holding train/")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile this many steps and print the top operators by self CPU time")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--shapes", action="store_true", help="profile: group the operators by input shape")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config, args.set)
    cfg.data.root = args.data
    torch.manual_seed(cfg.train.seed)
    _, annotations = train.data_paths(cfg, "train")
    chain = train.clips_per_sample(cfg, ytvis_format.load(annotations).max_length())
    dataset = train.build_train_dataset(cfg, chain)
    cfg.model.num_classes = len(dataset.class_names)
    model = build_model(cfg.model).train()
    optimizer = train.build_optimizer(model, cfg.train)
    step_module = train.TrainStep(model, TrackletCriterion(cfg.loss), cfg.data.lead_matching)
    trained = train.trained_clips(cfg, chain)
    total = args.warmup + args.steps + args.profile
    B = cfg.train.batch_size
    batches = [collate([dataset[(i * B + j) % len(dataset)] for j in range(B)]) for i in range(total)]

    def step(i):
        loss, _ = step_module(batches[i], train.lead_clips(cfg, i, chain), trained)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    seconds = (time.perf_counter() - start) / args.steps
    print(f"{cfg.name}: {seconds:.3f} s/step over {args.steps} steps ({chain} clips per sample, batch {B}, "
          f"{torch.get_num_threads()} threads)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
            for i in range(args.warmup + args.steps, total):
                step(i)
        print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
