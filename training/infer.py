"""`evis infer`: PyTorch inference of whole videos, clip by clip, to a YouTube-VIS results file.

The clip loop, slot tracking, mask pasting and scoring are the runtime's own (torch-free) code; this
module only provides a PyTorch backend for it, so PyTorch and ONNX Runtime/TensorRT results differ
only by what the graphs compute.

End-to-end linking (default): each clip starts from the previous clip's time-averaged output
queries; a slot that is background (max class probability < infer.background_threshold) for
infer.reset_after clips is reset to q* and its next object gets a new track id.
Hand-crafted linking (Table 1d ablation): every clip starts from q*, and tracklets of consecutive
clips are linked by Hungarian matching on box IoU, box L1, mask IoU and class agreement.
"""

import numpy as np
import torch

from efficientvis.errors import UserError
from efficientvis.runtime.clip_loop import LoopOptions
from efficientvis.runtime.dataset import check_class_names, run_dataset
from efficientvis.runtime.linking import linker_factory
from efficientvis.training import checkpoint
from efficientvis.training.model import build_model
from efficientvis.ytvis import format as ytvis_format


class TorchBackend:
    """The runtime backend interface (see runtime/clip_loop.py) on a PyTorch model."""

    def __init__(self, model, device):
        self.model, self.device = model.eval(), device
        self.num_queries = model.cfg.num_queries
        self.clip_length = model.cfg.clip_length
        self.queries = None

    @torch.no_grad()
    def start_video(self):
        self.queries = self.model.init_queries.weight[None].clone()

    @torch.no_grad()
    def run_clip(self, frames, reset, num_iterations=None, carried=None):
        if reset is not None and reset.any():
            mask = torch.as_tensor(reset, device=self.device)
            self.queries[0, mask] = self.model.init_queries.weight[mask]
        if carried is not None:  # the clip loop's (active (N,), boxes (N, 4)), as the graphs take it
            carried = tuple(torch.as_tensor(np.asarray(c))[None].to(self.device) for c in carried)
        x = torch.from_numpy(frames)[None].to(self.device)
        out = self.model(x, init_queries=self.queries, num_iterations=num_iterations, carried=carried)
        self.queries = out["next_queries"]
        last = out["stages"][-1]
        return {"class_logits": last["class_logits"][0].float().cpu().numpy(),
                "boxes": last["boxes"][0].float().cpu().numpy(),
                "mask_probs": last["mask_logits"][0].float().sigmoid().cpu().numpy()}


def inference_clip_length(cfg):
    """Frames per clip at inference: infer.clip_length, else the trained T (no weight depends on
    T; longer clips than trained mean fewer query hand-overs between clips)."""
    if cfg.infer.clip_length < 0:
        raise UserError(f"infer.clip_length must be >= 1 (or 0: the trained T), got {cfg.infer.clip_length}")
    return cfg.infer.clip_length or cfg.model.clip_length


def loop_options(cfg):
    if cfg.infer.top_k < 1:
        raise UserError(f"infer.top_k must be >= 1, got {cfg.infer.top_k}")
    if cfg.infer.num_iterations > cfg.model.num_iterations:
        raise UserError(f"infer.num_iterations must be at most the model's {cfg.model.num_iterations} "
                        f"iterations, got {cfg.infer.num_iterations}")
    return LoopOptions(clip_length=inference_clip_length(cfg), size=cfg.data.test_size,
                       max_size=cfg.data.max_size, num_iterations=cfg.infer.num_iterations,
                       background_threshold=cfg.infer.background_threshold,
                       reset_after=cfg.infer.reset_after, duplicate_iou=cfg.infer.duplicate_iou,
                       carry_threshold=cfg.model.carry_threshold if cfg.model.carry_proposals else None)


def infer_dataset(model, cfg, gt, image_root, out_path, device, progress=True, category_ids=None):
    """Every video of `gt` (a format.Dataset) -> results JSON at out_path, written video by video."""
    backend = TorchBackend(model, device)
    options = loop_options(cfg)
    make_linker = linker_factory(cfg.infer.linking, backend.num_queries, cfg.infer.background_threshold)
    category_ids = category_ids or gt.category_ids
    if len(category_ids) != cfg.model.num_classes:
        raise UserError(f"the model has {cfg.model.num_classes} classes, the annotations "
                        f"{len(category_ids)} categories")
    return run_dataset(backend, gt, image_root, options, out_path, cfg.model.num_classes, category_ids,
                       cfg.infer.top_k, make_linker, progress)


def load_model(path, device, overrides=()):
    """A model from a checkpoint: its own config (+ --set overrides for infer/data sections)."""
    from efficientvis.training.config import apply_overrides
    ckpt = checkpoint.load(path)
    cfg = checkpoint.config_of(ckpt, path)
    apply_overrides(cfg, overrides)
    model = build_model(cfg.model)
    checkpoint.load_model_state(model, ckpt["model"], path)
    return model.to(device).eval(), cfg, ckpt.get("class_names")


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="checkpoint (.pt) written by evis train")
    p.add_argument("--data", required=True, help="image root (the JPEGImages folder)")
    p.add_argument("--ann", required=True, help="YouTube-VIS annotation file (videos + categories)")
    p.add_argument("--out", required=True, help="results JSON to write")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override infer/data settings, e.g. --set infer.linking=handcrafted")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval", action="store_true", help="also evaluate against --ann (needs annotations)")
    p.add_argument("--threads", type=int, default=0)


def run(args):
    from efficientvis.training.train import pick_device
    from efficientvis.ytvis.results import check_output_file

    if args.threads < 0:
        raise UserError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    check_output_file(args.out, "--out")  # before the whole split has run
    model, cfg, class_names = load_model(args.checkpoint, device, args.set)
    loop_options(cfg)  # the infer.* values, checked before the first video
    gt = ytvis_format.load(args.ann)
    check_class_names(gt, class_names, args.ann, "checkpoint's")
    infer_dataset(model, cfg, gt, args.data, args.out, device)
    print(f"results: {args.out}")
    if args.eval:
        from efficientvis.ytvis.metric import evaluate, format_table
        metrics = evaluate(gt, ytvis_format.read_json(args.out, "results file"))
        print(format_table(metrics))
    return 0
