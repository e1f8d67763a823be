"""`evis train`: single process (CPU or one GPU) or `torchrun` (DDP, multi-GPU / multi-node).

Every step trains one batch of clips, or of clip pairs when correspondence learning is on (paper
Sec. 3.3): the second clip starts from the first clip's time-averaged output queries and reuses its
assignment. `data.correspondence_clips` > 2 chains more clips the same way (each starts from the
previous one's queries), and `data.lead_clips` runs clips before the chain without loss, so the
chain also starts from carried queries, as inference's later clips do. Checkpoints are written
atomically every `train.checkpoint_every` steps and at the end; `--resume` continues exactly (the
data order is a function of (seed, epoch, index)). `train.ema_decay` keeps a moving average of the
weights (ema.py) that validation scores and final.pt holds.
"""

import contextlib
import csv
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from efficientvis.errors import UserError
from efficientvis.training import checkpoint
from efficientvis.training.config import load_config
from efficientvis.training.denoising import noised_tracklet_boxes
from efficientvis.training.ema import ModelEMA
from efficientvis.training.dense_proposals import dense_proposal_loss
from efficientvis.training.losses import TrackletCriterion, semantic_loss
from efficientvis.training.dataset import collate
from efficientvis.training.model import build_model
from efficientvis.ytvis.results import atomic_file

LOSS_PARTS = ("class", "l1", "giou", "dice", "mask_bce", "dn_class", "dn_giou")


def add_arguments(p):
    p.add_argument("--config", default="tiny", help="config name (tiny, r50_ytvis19, ...) or YAML path")
    p.add_argument("--data", help="dataset root holding train/ and valid/ (overrides data.root)")
    p.add_argument("--out", required=True, help="work folder: checkpoints, TensorBoard and CSV logs")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", nargs="?", const="auto", help="resume from OUT/last.pt or a path")
    p.add_argument("--backbone-weights", help="torchvision-format ResNet ImageNet state dict (.pth)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")


class TrainStep(nn.Module):
    """One forward of a batch (or of a batch of clip chains) + loss, so DDP sees one forward per backward."""

    def __init__(self, model, criterion, lead_matching=False):
        super().__init__()
        self.model, self.criterion, self.lead_matching = model, criterion, lead_matching

    def forward(self, batch, lead=0, trained=1):
        """`lead` clips of a chain run first without loss or gradient, only for their output
        queries (data.lead_clips); the next `trained` clips are trained. With `lead_matching` the
        lead clips are also matched, and the first trained clip keeps their assignment as the
        second keeps the first's (Sec. 3.3), so a slot keeps its object over every hop."""
        clips = batch if isinstance(batch, list) else [batch]
        total, logs, assignments, queries, carried = 0.0, {}, None, None, None
        cfg = self.criterion.cfg
        with torch.no_grad():
            for clip in clips[:lead]:
                out = self.model(clip["frames"], clip["image_sizes"], init_queries=queries,
                                 masks="last" if self.lead_matching else "none", carried=carried)
                queries, carried = out["next_queries"], out.get("carried")
                if self.lead_matching:
                    assignments = self.criterion.assign(out["stages"][-1], clip["targets"], assignments)
        for clip in clips[lead:lead + trained]:
            noised = tracks = None
            if cfg.denoising_weight > 0:
                noised, tracks = zip(*(noised_tracklet_boxes(t, cfg.denoising_noise, cfg.denoising_negatives)
                                       for t in clip["targets"]))
            out = self.model(clip["frames"], clip["image_sizes"], init_queries=queries, denoise_boxes=noised,
                             carried=carried)
            loss, clip_logs, final = self.criterion(out, clip["targets"], assignments)
            if noised is not None:
                dn_loss, dn_logs = self.criterion.denoising(out["denoise"], clip["targets"], tracks,
                                                            len(out["stages"]))
                loss = loss + cfg.denoising_weight * dn_loss
                clip_logs.update(dn_logs, loss=float(loss.detach()))
            if "semantic_logits" in out:
                semantic = semantic_loss(out["semantic_logits"], clip["targets"], cfg)
                loss = loss + cfg.semantic_weight * semantic
                clip_logs.update(semantic=float(semantic.detach()), loss=float(loss.detach()))
            if "dense" in out:
                dense = dense_proposal_loss(*out["dense"], clip["targets"], cfg)
                loss = loss + cfg.dense_weight * dense
                clip_logs.update(dense=float(dense.detach()), loss=float(loss.detach()))
            total = total + loss
            for name, value in clip_logs.items():
                logs[name] = logs.get(name, 0.0) + value
            assignments, queries, carried = final, out["next_queries"], out.get("carried")
        return total, logs


def _distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local_rank


def _rank0(value, world, device):
    """Rank 0's value (an int) of a decision taken from the clock, on every rank: each rank's own
    clock would stop them at different steps, and the rank still training would wait forever in
    its all-reduce (seen with train.max_minutes under torchrun)."""
    if world == 1:
        return int(value)
    agreed = torch.tensor([int(value)], device=device)
    dist.broadcast(agreed, 0)
    return int(agreed)


def pick_device(choice, local_rank=0):
    """--device auto | cpu | cuda -> torch.device, or one line saying why not."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available to torch")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if choice != "cpu":
        raise UserError(f"--device must be auto, cpu or cuda, got {choice!r}")
    return torch.device("cpu")


def _to_device(batch, device):
    if isinstance(batch, list):
        return [_to_device(b, device) for b in batch]
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in batch["targets"]]
    return {"frames": batch["frames"].to(device, non_blocking=True),
            "image_sizes": batch["image_sizes"].to(device, torch.float32), "targets": targets}


def lr_factor(step, warmup_iters, drop_steps, schedule="step", total_steps=0):
    """Linear warm-up from 0.001, then x0.1 at every drop step ("step", the paper's) or a cosine
    decay to 0.01 at `total_steps` ("cosine"). A function of the step only: exact resume."""
    warm = min(1.0, 0.001 + (1 - 0.001) * step / warmup_iters) if warmup_iters > 0 else 1.0
    if schedule == "cosine":
        progress = min(1.0, max(0.0, (step - warmup_iters) / max(1, total_steps - warmup_iters)))
        return warm * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))
    return warm * 0.1 ** sum(step >= s for s in drop_steps)


def budgeted_steps(seconds_per_step, elapsed, budget_minutes, done, cap, margin=0.97):
    """The number of steps that ends training within `budget_minutes` (from the start of this
    process's loop, `elapsed` seconds ago, `done` steps made) at `seconds_per_step`, at most `cap`.
    The lr schedule is then laid out over that length, so a cosine decay ends on time instead of
    being cut by max_minutes, and a fast machine trains longer than a slow one. Fitted again from
    the mean speed while less than train.budget_refit_until of the run has gone (the cosine is
    still near its peak, so the lr barely moves), then fixed; the checkpoints keep it, so a resumed
    run keeps its schedule."""
    left = budget_minutes * 60 * margin - elapsed
    return max(done, min(cap, done + int(left / seconds_per_step)))


def build_optimizer(model, cfg):
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    groups = [{"params": rest, "lr": cfg.lr},
              {"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult}]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def data_paths(cfg, split):
    root = cfg.data.root
    if not root:
        raise UserError("no dataset: pass --data ROOT (a folder with train/ and valid/) or set data.root")
    if not os.path.isdir(root):
        raise UserError(f"dataset folder not found: {root}")
    images = os.path.join(root, getattr(cfg.data, f"{split}_images"))
    annotations = os.path.join(root, getattr(cfg.data, f"{split}_annotations"))
    return images, annotations


def build_train_dataset(cfg, clips_per_sample):
    from efficientvis.training.dataset import VideoClipDataset
    from efficientvis.training.transforms import build_transforms
    images, annotations = data_paths(cfg, "train")
    d = cfg.data
    transforms = build_transforms(min_size=d.train_sizes, max_size=d.max_size,
                                  flip_prob=0.5 if d.hflip else 0.0,
                                  crop={"relative_range": (0.5, 1.0), "prob": 0.5} if d.random_crop else None)
    return VideoClipDataset(annotations, images, cfg.model.clip_length, stride=d.frame_stride,
                            clips_per_sample=clips_per_sample, transforms=transforms,
                            samples_per_epoch=cfg.train.samples_per_epoch or None, seed=cfg.train.seed,
                            consecutive=d.correspondence_consecutive)


def clips_per_sample(cfg, max_length):
    """1 without correspondence learning, else the length of the sampled clip chains: the trained
    chain (2: the paper's pairs) plus up to `data.lead_clips` clips run before it."""
    mode = cfg.data.correspondence
    if mode not in ("auto", "on", "off"):
        raise UserError(f"data.correspondence must be auto, on or off, got {mode!r}")
    if cfg.data.correspondence_clips < 2:
        raise UserError(f"data.correspondence_clips must be >= 2, got {cfg.data.correspondence_clips}")
    if cfg.data.lead_clips < 0:
        raise UserError(f"data.lead_clips must be >= 0, got {cfg.data.lead_clips}")
    enabled = mode == "on" or (mode == "auto" and max_length > cfg.model.clip_length)
    return cfg.data.correspondence_clips + cfg.data.lead_clips if enabled else 1


def trained_clips(cfg, chain):
    """Clips of a sample that get a loss: the trained chain, or the single clip without
    correspondence learning."""
    return cfg.data.correspondence_clips if chain > 1 else 1


def lead_clips(cfg, step, chain):
    """Clips run without loss before the trained chain at this step: 0, 1, ..., data.lead_clips in
    turn, so the trained chain starts from q* (like inference's first clip) as often as from the
    queries of 1, 2, ... earlier clips (like its later clips)."""
    return step % (cfg.data.lead_clips + 1) if chain > 1 else 0


class Logger:
    """TensorBoard + CSV (one row per log step, flushed), on rank 0 only. Resumed at `step`, the
    rows and events a stopped run logged after its last checkpoint are dropped, so the logs hold
    each step once, as an uninterrupted run would (a fresh run in an old folder starts them anew)."""

    def __init__(self, out_dir, enabled, step=0):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=step + 1)
        self.out_dir = out_dir
        for name in ("train", "valid"):
            self._drop_rows_after(name, step)

    def _drop_rows_after(self, name, step):
        path = os.path.join(self.out_dir, f"{name}.csv")
        if not os.path.exists(path):
            return
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        # a row cut short by the kill has no valid step (or misses fields): dropped too
        kept = [r for r in rows
                if (r.get("step") or "").isdigit() and int(r["step"]) <= step and None not in r.values()]
        if len(kept) == len(rows):
            return
        with atomic_file(path) as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)

    def _csv(self, name, row):
        path = os.path.join(self.out_dir, f"{name}.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def scalars(self, name, step, values):
        if not self.enabled:
            return
        for k, v in values.items():
            self.tb.add_scalar(f"{name}/{k}", v, step)
        self.tb.flush()
        self._csv(name, {"step": step, **values})

    def close(self):
        if self.enabled:
            self.tb.close()


def run(args):
    world, rank, local_rank = _distributed()
    cfg = load_config(args.config, args.set)
    if args.data:
        cfg.data.root = args.data
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device, local_rank)
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.train.seed)
    main = rank == 0
    os.makedirs(args.out, exist_ok=True)

    from efficientvis.ytvis import format as ytvis_format
    _, train_ann = data_paths(cfg, "train")
    max_length = ytvis_format.load(train_ann).max_length()
    chain = clips_per_sample(cfg, max_length)
    dataset = build_train_dataset(cfg, chain)
    if cfg.model.num_classes != len(dataset.class_names):
        if main:
            print(f"model.num_classes set to {len(dataset.class_names)} from the dataset")
        cfg.model.num_classes = len(dataset.class_names)

    model = build_model(cfg.model)
    if args.backbone_weights:
        from efficientvis.training.backbone import load_backbone_weights
        load_backbone_weights(model.backbone.body, args.backbone_weights)
    model.to(device)
    optimizer = build_optimizer(model, cfg.train)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resume overwrites them
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp and device.type == "cuda")

    # the weight average lives on rank 0 only, which validates and saves it
    ema = None
    if cfg.train.ema_decay != 0 and main:  # NaN or negative: ModelEMA says so
        ema = ModelEMA(model, cfg.train.ema_decay, cfg.train.ema_warmup_steps)
    scored = model if ema is None else ema.module  # validated and saved as final.pt
    step, budget_total = 0, 0
    resume_path = os.path.join(args.out, "last.pt") if args.resume == "auto" else args.resume
    if args.resume and (args.resume != "auto" or os.path.exists(resume_path)):
        ckpt = checkpoint.load(resume_path)
        checkpoint.check_model_config(checkpoint.config_of(ckpt, resume_path).model, cfg.model, resume_path)
        checkpoint.load_model_state(model, ckpt["model"], resume_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        if ema is not None:
            if "ema" in ckpt:
                checkpoint.load_model_state(ema.module, ckpt["ema"], resume_path)
            else:
                ema.load_state_dict(model.state_dict())
                print(f"{resume_path} has no weight average: train.ema_decay starts it from step {step}")
        budget_total = int(ckpt.get("budget_total_steps", 0))
        if main:
            print(f"resumed from {resume_path} at step {step}")

    reduce = None
    if world > 1:
        def reduce(x):
            x = x.to(device)
            dist.all_reduce(x)
            return x / world
    step_module = TrainStep(model, TrackletCriterion(cfg.loss, reduce), cfg.data.lead_matching)
    trained = trained_clips(cfg, chain)
    if world > 1:
        # find_unused_parameters: an FPN level's output conv gets no gradient in a step where no
        # RoI is assigned to that level (training pools each RoI on its own level only)
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[local_rank] if device.type == "cuda" else None,
            find_unused_parameters=True)

    per_rank = math.ceil(len(dataset) / world)
    batches_per_epoch = max(1, per_rank // cfg.train.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // cfg.train.accumulate)
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    budget_cap = total_steps
    if cfg.train.budget_minutes and budget_total:  # fixed by the run this one resumes
        total_steps = min(total_steps, budget_total)
    drop_steps = [e * steps_per_epoch for e in cfg.train.lr_drop_epochs]
    if cfg.train.lr_schedule not in ("step", "cosine"):
        raise UserError(f"train.lr_schedule must be step or cosine, got {cfg.train.lr_schedule!r}")
    first_step = step
    fit_budget = cfg.train.budget_minutes > 0 and not budget_total  # the length is still to be fitted
    logger = Logger(args.out, main, step)
    if main:
        checkpoint_meta = dict(config=cfg.to_dict(), class_names=dataset.class_names,
                               category_ids=[int(c) for c in dataset.category_ids])
        with open(os.path.join(args.out, "config.yaml"), "w") as f:
            import yaml
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        print(f"training {cfg.name}: {len(dataset)} samples/epoch, {steps_per_epoch} steps/epoch, "
              f"{total_steps} steps{' at most (fitted to train.budget_minutes)' if fit_budget else ''}, "
              f"correspondence learning {f'on ({chain} clips)' if chain > 1 else 'off'}, "
              f"device {device}, world size {world}")

    def save(name):
        if main:
            checkpoint.save(os.path.join(args.out, name), model=model.state_dict(),
                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                            budget_total_steps=budget_total, **checkpoint_meta,
                            **({"ema": ema.state_dict()} if ema is not None else {}))

    start_time = time.time()
    bar = tqdm(total=total_steps, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    model.train()
    stop = False
    while step < total_steps and not stop:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        order = np.random.default_rng((cfg.train.seed, epoch)).permutation(len(dataset))
        mine = order[rank::world][: batches_per_epoch * cfg.train.batch_size]
        mine = mine[step_in_epoch * cfg.train.accumulate * cfg.train.batch_size:]
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.train.batch_size, sampler=mine.tolist(),
            num_workers=cfg.data.num_workers, collate_fn=collate,
            persistent_workers=False, drop_last=True)
        micro, window = 0, {}
        t0 = time.time()
        for batch in loader:
            batch = _to_device(batch, device)
            sync = (micro + 1) % cfg.train.accumulate == 0
            ctx = step_module.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx, torch.autocast(device.type, dtype=torch.float16,
                                     enabled=cfg.train.amp and device.type == "cuda"):
                loss, logs = step_module(batch, lead_clips(cfg, step, chain), trained)
                scaler.scale(loss / cfg.train.accumulate).backward()
            for k, v in logs.items():
                window[k] = window.get(k, 0.0) + v
            micro += 1
            if not sync:
                continue
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * lr_factor(step, cfg.train.warmup_iters, drop_steps, cfg.train.lr_schedule,
                                           total_steps)
            if cfg.train.clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.update(model, step)
            timed = step - first_step - cfg.train.budget_warmup_steps  # steps since the speed is timed
            if fit_budget and timed == 0:
                timing_start = time.time()
            if fit_budget and timed > 0 and timed % cfg.train.budget_calibration_steps == 0:
                rate = (time.time() - timing_start) / timed
                fitted = _rank0(budgeted_steps(rate, time.time() - start_time, cfg.train.budget_minutes,
                                               step, budget_cap), world, device)  # one length on every rank
                fit_budget = step < cfg.train.budget_refit_until * fitted
                if main and abs(fitted - budget_total) > 0.01 * budget_total:  # the first fit, large changes
                    print(f"\n{rate:.2f} s/step over {timed} steps: {fitted} steps fit "
                          f"train.budget_minutes={cfg.train.budget_minutes:g}"
                          f"{f' (was {budget_total})' if budget_total else ''}")
                budget_total = total_steps = fitted
                bar.total = total_steps
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.3f}", epoch=epoch)
            if step % cfg.train.log_every == 0 or step == total_steps:
                n = micro
                row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                       "loss": window["loss"] / n,
                       **{p: sum(v for k, v in window.items() if k.startswith(p + "_")) / n for p in LOSS_PARTS},
                       **{k: window[k] / n for k in ("semantic", "dense") if k in window},
                       "sec_per_step": (time.time() - t0) / max(1, micro // cfg.train.accumulate)}
                logger.scalars("train", step, row)
                micro, window, t0 = 0, {}, time.time()
            if step % cfg.train.checkpoint_every == 0:
                save("last.pt")
            minutes = (time.time() - start_time) / 60
            if cfg.train.max_minutes and _rank0(minutes >= cfg.train.max_minutes, world, device):
                if main:
                    print(f"\nstopping after {minutes:.1f} min (train.max_minutes) at step {step}")
                stop = True
            if step % steps_per_epoch == 0 or step == total_steps or stop:
                break
        epoch_done = step // steps_per_epoch
        at_end = step >= total_steps or stop
        save("last.pt")
        if main and (at_end or (cfg.train.eval_every and epoch_done % cfg.train.eval_every == 0)):
            metrics = evaluate_checkpoint(scored, cfg, dataset.class_names, device, args.out)
            if metrics:
                logger.scalars("valid", step, metrics)
                print(f"\nstep {step}: valid AP {metrics['AP']:.4f} AP50 {metrics['AP50']:.4f}")
            model.train()
        if world > 1:
            dist.barrier()
    bar.close()
    if main:
        checkpoint.save(os.path.join(args.out, "final.pt"), model=scored.state_dict(), step=step,
                        **checkpoint_meta)
        print(f"done: {os.path.join(args.out, 'final.pt')} after {step} steps, "
              f"{(time.time() - start_time) / 60:.1f} min")
    logger.close()
    if world > 1:
        dist.destroy_process_group()
    return 0


def evaluate_checkpoint(model, cfg, class_names, device, out_dir):
    """Validation with the YouTube-VIS metric on the valid split (skipped if it has none)."""
    from efficientvis.training.infer import infer_dataset
    from efficientvis.ytvis import format as ytvis_format
    from efficientvis.ytvis.metric import evaluate
    try:
        images, annotations = data_paths(cfg, "valid")
    except UserError:
        return None
    if not os.path.isfile(annotations):
        return None
    gt = ytvis_format.load(annotations)
    results_path = os.path.join(out_dir, "valid_results.json")
    model.eval()
    infer_dataset(model, cfg, gt, images, results_path, device, progress=False)
    from efficientvis.ytvis.format import read_json
    return evaluate(gt, read_json(results_path, "results file"))
