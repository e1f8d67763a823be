"""How much the carried queries help: a checkpoint's valid AP with the query feedback weakened.

    python benchmarks/query_feedback.py --checkpoint models/tiny/tiny.pt --data data/synth/valid \
        [--alphas 1,0.5,0.25,0] [--clip-lengths 6]

Each clip starts from alpha * (previous clip's output queries) + (1 - alpha) * q*. alpha = 1 is
the paper's end-to-end scheme (`evis infer`); alpha = 0 starts every clip from q* and still keeps
identity by query slot, with no association at all. If alpha = 0 scores as well as alpha = 1, the
model has not learned to carry objects in its queries: its slots find the same objects from q*
alone. A diagnostic for training recipes, not an inference option.
"""

import argparse
import os

import torch

from efficientvis.training import infer
from efficientvis.ytvis import format as ytvis_format
from efficientvis.ytvis.metric import evaluate


class BlendedFeedback(infer.TorchBackend):
    """`evis infer`'s PyTorch backend with the carried queries pulled towards q*."""

    def __init__(self, model, device, alpha):
        super().__init__(model, device)
        self.alpha = alpha

    @torch.no_grad()
    def run_clip(self, frames, reset, num_iterations=None, carried=None):
        out = super().run_clip(frames, reset, num_iterations, carried)
        self.queries = self.alpha * self.queries + (1 - self.alpha) * self.model.init_queries.weight[None]
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="models/tiny/tiny.pt")
    p.add_argument("--data", default="data/synth/valid", help="split folder with JPEGImages/ and annotations.json")
    p.add_argument("--alphas", default="1,0.5,0.25,0")
    p.add_argument("--clip-lengths", default="", help="comma-separated T to try (default: the checkpoint's)")
    p.add_argument("--out", default="outputs/query_feedback")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cpu")
    gt = ytvis_format.load(os.path.join(args.data, "annotations.json"))
    lengths = [int(t) for t in args.clip_lengths.split(",") if t] or [None]
    print("| T | alpha | AP | AP50 | AP75 | AR10 |\n|---|---|---|---|---|---|")
    for T in lengths:
        model, cfg, _ = infer.load_model(args.checkpoint, device, [f"model.clip_length={T}"] if T else [])
        for alpha in (float(a) for a in args.alphas.split(",")):
            backend = BlendedFeedback(model, device, alpha)
            out = os.path.join(args.out, f"results_T{cfg.model.clip_length}_alpha{alpha:g}.json")
            infer.run_dataset(backend, gt, os.path.join(args.data, "JPEGImages"), infer.loop_options(cfg), out,
                              cfg.model.num_classes, gt.category_ids, cfg.infer.top_k,
                              infer.linker_factory("e2e", backend.num_queries, cfg.infer.background_threshold),
                              progress=False)
            m = evaluate(gt, ytvis_format.read_json(out, "results file"))
            print(f"| {cfg.model.clip_length} | {alpha:g} | {100 * m['AP']:.1f} | {100 * m['AP50']:.1f} "
                  f"| {100 * m['AP75']:.1f} | {100 * m['AR10']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
