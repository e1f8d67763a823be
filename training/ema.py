"""Exponential moving average of the weights (`train.ema_decay`), as RT-DETR and the YOLO trainers
keep: the average of the last ~1/(1 - decay) steps' weights is less noisy than the last step's,
which matters most in a short training. It is what validation scores and what final.pt holds."""

import copy
import math

import torch

from efficientvis.errors import UserError


class ModelEMA:
    """ema = d * ema + (1 - d) * weights after every optimizer step, over every floating-point
    entry of the state dict (BatchNorm's running statistics too); integer buffers are copied.
    d ramps up as decay * (1 - exp(-step / warmup_steps)), so the first steps' random weights
    fade out quickly. A function of the global step only, so a resumed run averages exactly as an
    uninterrupted one."""

    def __init__(self, model, decay, warmup_steps=100):
        if not 0.0 < decay < 1.0:
            raise UserError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.decay, self.warmup_steps = decay, max(1, warmup_steps)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step):
        return self.decay * (1.0 - math.exp(-step / self.warmup_steps))

    @torch.no_grad()
    def update(self, model, step):
        """`step`: optimizer steps done, this one included."""
        d = self.decay_at(step)
        averaged = self.module.state_dict()
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                averaged[name].lerp_(value, 1.0 - d)
            else:
                averaged[name].copy_(value)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)
