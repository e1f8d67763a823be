"""Checkpoints: written atomically, loaded with weights_only=True, checked against the config."""

import os

import torch

from efficientvis import __version__
from efficientvis.errors import UserError
from efficientvis.training.config import Config, ModelConfig, from_dict


def save(path, **content):
    """torch.save to a temporary file in the same folder, then an atomic rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save({"version": __version__, **content}, tmp)
    os.replace(tmp, path)


def load(path) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickle with objects, not a torch file
        raise UserError(f"checkpoint {path} cannot be loaded safely ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"checkpoint {path} is not an EfficientVIS checkpoint (no 'model'/'config')")
    return ckpt


def config_of(ckpt, path) -> Config:
    return from_dict(ckpt["config"], f"checkpoint {path}")


def check_model_config(ckpt_cfg: ModelConfig, cfg: ModelConfig, path):
    """A checkpoint of another architecture gives one line naming the fields that differ."""
    shape_fields = ["backbone", "backbone_width", "hidden_dim", "num_queries", "num_iterations",
                    "num_classes", "num_heads", "ffn_dim", "dynamic_dim", "pooler_size",
                    "mask_pooler_size", "attention", "dynamic_conv", "semantic_head"]
    diffs = [f"{f}: checkpoint {getattr(ckpt_cfg, f)!r} vs config {getattr(cfg, f)!r}"
             for f in shape_fields if getattr(ckpt_cfg, f) != getattr(cfg, f)]
    if diffs:
        raise UserError(f"checkpoint {path} was trained with another model config ({'; '.join(diffs)})")


def load_model_state(model, state, path):
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise UserError(f"checkpoint {path} does not fit the model ({str(e).splitlines()[1].strip()[:200]})") from None
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not fit the model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
