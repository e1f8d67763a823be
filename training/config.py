"""Experiment configuration: dataclasses with the paper's defaults, YAML files, command-line overrides.

A config file names only what differs from these defaults; `--set section.key=value` overrides
any field from the command line (values parsed as YAML: 10, 2.5e-5, [320, 352], true).
"""

import dataclasses
import os
from dataclasses import dataclass, field

import yaml

from efficientvis.errors import UserError

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@dataclass
class ModelConfig:
    backbone: str = "resnet50"        # resnet18 | resnet34 | resnet50 | resnet101
    backbone_width: int = 64          # base channels of the ResNet (64 = torchvision's)
    freeze_at: int = 1                # 0: train all, 1: freeze the stem, 2: stem + layer1
    norm: str = "frozen"              # frozen (pretrained BatchNorm) | bn (training from scratch)
    hidden_dim: int = 256             # C: FPN channels = query embedding size
    num_queries: int = 10             # N tracklet queries
    num_iterations: int = 6           # M query-video iterations
    init_boxes: str = "image"         # initial proposals: image (whole image, paper) | grid (N cells)
                                      # | dense (peaks of a dense objectness head: training/dense_proposals.py)
    dense_level: int = 1              # FPN level of that head (0 = P2, 1 = P3, ...)
    clip_length: int = 36             # T frames per clip
    num_classes: int = 40
    num_heads: int = 8
    ffn_dim: int = 2048
    dynamic_dim: int = 64             # D of the dynamic filters (C x D, D x C)
    pooler_size: int = 7              # RoI size of the query path
    mask_pooler_size: int = 14        # RoI size of the mask path (masks are 2x this)
    mask_convs: int = 4               # 3x3 convs of the mask head (QueryInst: 4)
    mask_conv_dim: int = 0            # their channels (0: hidden_dim)
    sampling_ratio: int = 2
    attention: str = "factorised"     # factorised | spatial | temporal | joint  (Table 1a)
    dynamic_conv: str = "temporal"    # temporal | still                      (Table 1b)
    time_shared_queries: bool = False  # True: one embedding per query       (Table 1f)
    dropout: float = 0.0
    prior_prob: float = 0.01
    # training only: per-pixel class logits on P2 with a dense loss (loss.semantic_weight), so the
    # backbone gets a gradient at every pixel, not only inside the queries' RoIs (CondInst's
    # auxiliary semantic loss); never exported, never used at inference
    semantic_head: bool = False
    # not in the paper (Sec. 3.3 resets the proposals every clip): a slot that held an object in
    # the previous clip (max class probability >= carry_threshold) starts the next clip from its
    # last-frame box instead of the learned initial proposal
    carry_proposals: bool = False
    carry_threshold: float = 0.2


@dataclass
class DataConfig:
    root: str = ""                    # folder holding train/ and valid/ (YouTube-VIS layout)
    train_images: str = "train/JPEGImages"
    train_annotations: str = "train/annotations.json"
    valid_images: str = "valid/JPEGImages"
    valid_annotations: str = "valid/annotations.json"
    frame_stride: int = 1             # >1 simulates a low frame rate (Table 1h)
    train_sizes: list = field(default_factory=lambda: [360])  # shortest side; several = multi-scale
    max_size: int = 640
    test_size: int = 360
    hflip: bool = False
    random_crop: bool = False
    correspondence: str = "auto"      # auto: on when the longest video has more than T frames
    correspondence_clips: int = 2     # clips chained per sample when on (paper: pairs); > 2 trains more hops
    correspondence_consecutive: bool = False  # chain clips back to back (as at inference) instead of anywhere
    lead_clips: int = 0               # >0: chains start from the queries of 0..lead_clips earlier clips (no loss)
    lead_matching: bool = False       # the chain keeps its lead clips' assignment (identity over every hop)
    num_workers: int = 2


@dataclass
class LossConfig:
    class_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    dice_weight: float = 8.0
    mask_bce_weight: float = 2.0      # Eq. 5's L_CE, on every frame (absent frames -> empty mask)
    mask_targets: str = "hard"        # hard (the RoI crop of the mask >= 0.5) | soft (the crop itself)
    class_loss: str = "focal"         # focal (paper Eq. 5) | varifocal (IoU targets, RT-DETR)
    focal_alpha: float = 0.25
    varifocal_alpha: float = 0.75
    focal_gamma: float = 2.0
    match_class: float = 2.0
    match_l1: float = 5.0
    match_giou: float = 2.0
    match_mask: float = 2.0
    denoising_weight: float = 0.0     # > 0: denoising tracklets (training/denoising.py; not in the paper)
    denoising_noise: float = 0.4      # their box noise: centre +- noise * size / 2, size x (1 +- noise)
    denoising_negatives: bool = False # and a negative per track, noised 1-2x as much, target background
    semantic_weight: float = 1.0      # the dense loss of model.semantic_head (when it is on)
    dense_weight: float = 1.0         # the dense proposal loss of model.init_boxes=dense


@dataclass
class TrainConfig:
    epochs: int = 33
    lr_drop_epochs: list = field(default_factory=lambda: [27])
    lr_schedule: str = "step"         # step (x0.1 at lr_drop_epochs, the paper's) | cosine (to 1 % at the end)
    samples_per_epoch: int = 0        # 0: one sample per training video
    batch_size: int = 1               # clips (or clip pairs) per process
    accumulate: int = 1               # gradient accumulation steps
    lr: float = 2.5e-5
    backbone_lr_mult: float = 1.0
    weight_decay: float = 1e-4
    clip_grad: float = 1.0
    warmup_iters: int = 1000
    amp: bool = True                  # autocast on CUDA only
    checkpoint_every: int = 1000      # iterations
    eval_every: int = 1               # epochs; 0 = only at the end
    log_every: int = 20
    seed: int = 0
    max_minutes: float = 0.0          # >0: stop (with a checkpoint) after this wall time
    max_steps: int = 0                # >0: stop after this many steps (ablations at an equal schedule)
    budget_minutes: float = 0.0       # >0: the schedule's length is fitted to this wall time (see below)
    budget_calibration_steps: int = 50  # steps timed before the budgeted length is first fitted
    # steps run before that timing starts: the first ones are slower (allocator and oneDNN warm-up,
    # the data loader starting); timing them made a 27-minute budget end 3 minutes early
    budget_warmup_steps: int = 10
    # the length is fitted again every budget_calibration_steps from the mean speed since the timing
    # started, until this fraction of it has run: a slow first window (another job on the machine)
    # fixed a 27-minute budget at 1586 steps that ran in 20.7 minutes
    budget_refit_until: float = 0.25
    ema_decay: float = 0.0            # >0: keep an exponential moving average of the weights (ema.py);
    ema_warmup_steps: int = 100       # validation scores it and final.pt holds it; last.pt the raw weights


@dataclass
class InferConfig:
    top_k: int = 10                   # results per video
    reset_after: int = 3              # a slot background for this many clips gets q* back
    background_threshold: float = 0.2  # a slot is background in a clip if max class prob < this
    linking: str = "e2e"              # e2e (query feedback) | handcrafted (Table 1d)
    num_iterations: int = 0           # 0: all M (anytime inference with fewer)
    clip_length: int = 0              # frames per clip at inference; 0: the trained T (no weight depends on T)
    # > 0: within a clip, of tracks whose masks overlap by this mean IoU only the highest-scoring is
    # output (cleaner overlays and tracks.jsonl; costs AP, which rewards duplicates as hypotheses)
    duplicate_iou: float = 0.0


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _apply(cfg: Config, section: str, key: str, value, where: str):
    sections = {f.name for f in dataclasses.fields(cfg)} - {"name"}
    if section not in sections:
        raise UserError(f"{where}: unknown config section '{section}' (sections: {', '.join(sorted(sections))})")
    obj = getattr(cfg, section)
    names = {f.name: f for f in dataclasses.fields(obj)}
    if key not in names:
        raise UserError(f"{where}: unknown key '{section}.{key}' (keys: {', '.join(names)})")
    default = getattr(obj, key)
    if isinstance(default, str) and isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
        value = "on" if value else "off"
    if isinstance(default, bool) and not isinstance(value, bool):
        raise UserError(f"{where}: '{section}.{key}' must be true/false, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UserError(f"{where}: '{section}.{key}' must be a number, got {value!r}")
        if isinstance(default, int) and not float(value).is_integer():
            raise UserError(f"{where}: '{section}.{key}' must be a whole number, got {value!r}")
        value = type(default)(value)
    if isinstance(default, list) and not isinstance(value, list):
        value = [value]
    setattr(obj, key, value)


def from_dict(data: dict, where: str = "config") -> Config:
    cfg = Config()
    for section, values in (data or {}).items():
        if section == "name":
            cfg.name = str(values)
            continue
        if not isinstance(values, dict):
            raise UserError(f"{where}: section '{section}' must be a mapping")
        for key, value in values.items():
            _apply(cfg, section, key, value, where)
    return cfg


def config_path(name_or_path: str) -> str:
    """A config name ('tiny', 'r50_ytvis19') or a path to a YAML file."""
    if os.path.isfile(name_or_path):
        return name_or_path
    candidate = os.path.join(CONFIG_DIR, f"{name_or_path}.yaml")
    if os.path.isfile(candidate):
        return candidate
    known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    raise UserError(f"config '{name_or_path}' not found (a YAML path or one of: {', '.join(known)})")


def load_config(name_or_path: str, overrides=()) -> Config:
    path = config_path(name_or_path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid YAML ({e})") from None
    cfg = from_dict(data, path)
    apply_overrides(cfg, overrides)
    return cfg


def apply_overrides(cfg: Config, overrides):
    for item in overrides or ():
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-4")
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        _apply(cfg, section, key, yaml.safe_load(raw), f"--set {item}")
    return cfg
