"""ResNet + FPN backbone (P2..P5, strides 4, 8, 16, 32) with the input normalisation built in.

Written here (torchvision is not a dependency), with parameter and buffer names identical to
torchvision's ResNet ``state_dict`` (``conv1``, ``bn1``, ``layer1``..``layer4``; blocks
``conv1/bn1/conv2/bn2/(conv3/bn3)/downsample.0/downsample.1``; ``fc`` dropped), so a local
torchvision ImageNet checkpoint loads with strict key matching (see `load_backbone_weights`).

Conventions (Sparse R-CNN / QueryInst / detectron2):
- Every BatchNorm is a `FrozenBatchNorm2d` (fixed affine transform, as detectron2's "FrozenBN") unless
  ``norm="bn"`` is asked for (plain trainable BatchNorm2d, e.g. for a tiny model trained from
  scratch); frozen stages always use FrozenBatchNorm2d.
- ``freeze_at`` as in detectron2: 0 trains everything, 1 freezes the stem (conv1 + bn1), 2 also
  freezes layer1 ("res2"); detectron2's own default is 2, this toolkit's is 1.
- ``width`` is the ResNet's base channel count: 64 is torchvision's; 32 halves every stage (stem 32,
  stages 32/64/128/256 times the block expansion). Parameter names never change, only shapes do, so a
  torchvision checkpoint only fits width 64.
- FPN: lateral 1x1 and output 3x3 convs (with bias), top-down nearest upsampling to the lateral's
  exact size (``F.interpolate(size=...)``), so odd input sizes work and H/W stay dynamic in ONNX.

Input: (B, 3, H, W) RGB, uint8 or float in 0..255 (the exported ONNX takes uint8); it is converted
to float and normalised with ImageNet mean/std (buffers) inside the module.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from efficientvis.errors import UserError

# torchvision's ImageNet normalisation, on the 0..255 scale (RGB).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # 123.675, 116.28, 103.53
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)  # 58.395, 57.12, 57.375

# depth -> (block type, blocks per stage)
RESNET_SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
STRIDES = (4, 8, 16, 32)  # P2, P3, P4, P5


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters: y = (x - mean) / sqrt(var + eps) * w + b.

    Buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` (names of nn.BatchNorm2d, so
    torchvision checkpoints load); a ``num_batches_tracked`` entry in a checkpoint is ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "FrozenBatchNorm2d":
        frozen = cls(bn.num_features, bn.eps)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            if bn.track_running_stats:
                frozen.running_mean.copy_(bn.running_mean)
                frozen.running_var.copy_(bn.running_var)
        return frozen

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "frozen":
        return FrozenBatchNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    raise UserError(f"unknown backbone norm {kind!r}: use 'frozen' or 'bn'")


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, norm="frozen"):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = _norm(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = _norm(norm, planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, norm="frozen"):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = _norm(norm, planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = _norm(norm, planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = _norm(norm, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-layout ResNet without avgpool/fc; forward returns C2..C5.

    (B, 3, H, W) normalised float -> [C2 (B, 1*e*w, H/4), C3 (B, 2*e*w, H/8), C4 (B, 4*e*w, H/16),
    C5 (B, 8*e*w, H/32)] with w = width and e = block expansion (1 basic, 4 bottleneck); sizes round
    up (conv arithmetic of stride-2 convs with padding: ceil(H/2) per step).
    """

    def __init__(self, name: str = "resnet50", width: int = 64, freeze_at: int = 1,
                 norm: str = "frozen"):
        super().__init__()
        if name not in RESNET_SPECS:
            raise UserError(f"unknown backbone {name!r}: choose one of {', '.join(RESNET_SPECS)}")
        if not isinstance(width, int) or width < 1:
            raise UserError(f"backbone width must be a positive integer, got {width!r}")
        if freeze_at not in (0, 1, 2):
            raise UserError(f"freeze_at must be 0, 1 or 2, got {freeze_at!r}")
        kind, layers = RESNET_SPECS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.name = name
        self.width = width
        self.freeze_at = freeze_at
        self.inplanes = width
        stem_norm = "frozen" if freeze_at >= 1 else norm
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = _norm(stem_norm, width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0], 1, "frozen" if freeze_at >= 2 else norm)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2, norm)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2, norm)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2, norm)
        self.out_channels = [width * m * block.expansion for m in (1, 2, 4, 8)]
        self._init_weights()
        self._freeze()

    def _make_layer(self, block, planes, blocks, stride, norm):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       _norm(norm, planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, norm)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, norm=norm) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self):  # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _freeze(self):
        frozen = []
        if self.freeze_at >= 1:
            frozen += [self.conv1, self.bn1]
        if self.freeze_at >= 2:
            frozen.append(self.layer1)
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x):  # x: (B, 3, H, W) normalised float
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, w, H/4, W/4)
        c2 = self.layer1(x)  # (B, e*w, H/4, W/4)
        c3 = self.layer2(c2)  # (B, 2*e*w, H/8, W/8)
        c4 = self.layer3(c3)  # (B, 4*e*w, H/16, W/16)
        c5 = self.layer4(c4)  # (B, 8*e*w, H/32, W/32)
        return [c2, c3, c4, c5]


class FPN(nn.Module):
    """Feature pyramid (Lin et al.; detectron2 layout without P6): C2..C5 -> P2..P5, each out_channels."""

    def __init__(self, in_channels: list[int], out_channels: int = 256):
        super().__init__()
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for conv in [*self.lateral_convs, *self.output_convs]:  # detectron2's c2_xavier_fill
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)

    def forward(self, feats):  # [C2..C5] -> [P2 (B, C, H/4, W/4), ..., P5 (B, C, H/32, W/32)]
        prev = self.lateral_convs[-1](feats[-1])
        outs = [self.output_convs[-1](prev)]
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.lateral_convs[i](feats[i])
            # size= (not scale_factor=2): odd sizes round up in the ResNet, so 2x may not match
            prev = lateral + F.interpolate(prev, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.output_convs[i](prev))
        return outs


class Backbone(nn.Module):
    """Normalisation + ResNet (``body``) + FPN (``fpn``).

    forward: images (B, 3, H, W) RGB uint8 or float 0..255 -> [P2, P3, P4, P5], Pk of shape
    (B, fpn_channels, ceil(H / 2^k), ceil(W / 2^k)) (strides `self.strides` = 4, 8, 16, 32).
    """

    def __init__(self, name: str = "resnet50", width: int = 64, fpn_channels: int = 256,
                 freeze_at: int = 1, norm: str = "frozen"):
        super().__init__()
        self.body = ResNet(name, width=width, freeze_at=freeze_at, norm=norm)
        self.fpn = FPN(self.body.out_channels, fpn_channels)
        self.strides = STRIDES
        self.out_channels = fpn_channels
        # ImageNet statistics on the 0..255 scale, (1, 3, 1, 1); not saved in checkpoints.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images):  # (B, 3, H, W) uint8/float 0..255 -> (B, 3, H, W) float
        x = images if images.is_floating_point() else images.to(self.pixel_mean.dtype)
        return (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)

    def forward(self, images):
        return self.fpn(self.body(self.normalize(images)))


def build_backbone(name: str = "resnet50", width: int = 64, fpn_channels: int = 256,
                   freeze_at: int = 1, weights: str | os.PathLike | None = None,
                   norm: str = "frozen") -> Backbone:
    """ResNet-{18,34,50,101} + FPN; ``weights``: optional torchvision ImageNet checkpoint file."""
    model = Backbone(name, width=width, fpn_channels=fpn_channels, freeze_at=freeze_at, norm=norm)
    if weights:
        load_backbone_weights(model, weights)
    return model


def _is_ignored(key: str) -> bool:
    return key.startswith("fc.") or key.endswith("num_batches_tracked")


def describe_resnet_checkpoint(state_dict: dict) -> str:
    """Best guess of which ResNet a torchvision-style state_dict holds, e.g. 'resnet50 (width 64)'."""
    blocks = []
    for layer in range(1, 5):
        idx = {int(k.split(".")[1]) for k in state_dict if k.startswith(f"layer{layer}.")
               and k.split(".")[1].isdigit()}
        blocks.append(max(idx) + 1 if idx else 0)
    kind = "bottleneck" if any(k.startswith("layer1.0.conv3.") for k in state_dict) else "basic"
    name = next((n for n, (k, b) in RESNET_SPECS.items() if k == kind and tuple(blocks) == b), None)
    w = state_dict.get("conv1.weight")
    width = f" (width {w.shape[0]})" if isinstance(w, torch.Tensor) and w.dim() == 4 else ""
    if name is None:
        return f"unknown-architecture ({kind} blocks {blocks}){width}"
    return f"{name}{width}"


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a torchvision ResNet checkpoint into ``model`` (a `Backbone` or a `ResNet`).

    The file holds a raw state_dict or {"state_dict": ...} / {"model": ...} (a uniform "module."
    prefix is stripped). ``fc.*`` and ``*.num_batches_tracked`` are ignored; every other backbone key
    must be present with the same shape and no extra key may exist, else `UserError` naming the file
    and the first offending keys.
    """
    path = os.fspath(path)
    resnet = model.body if isinstance(model, Backbone) else model
    if not os.path.isfile(path):
        raise UserError(f"backbone weights file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with non-tensor objects, ...
        raise UserError(f"cannot read backbone weights {path}: {type(e).__name__}: {e}") from None
    if isinstance(ckpt, dict):
        for key in ("state_dict", "model"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise UserError(f"backbone weights {path} is not a state_dict (name -> tensor)")
    if ckpt and all(k.startswith("module.") for k in ckpt):
        ckpt = {k[len("module."):]: v for k, v in ckpt.items()}

    given = {k: v for k, v in ckpt.items() if not _is_ignored(k)}
    expected = {k: v for k, v in resnet.state_dict().items() if not _is_ignored(k)}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in given and given[k].shape != v.shape]
    if missing or unexpected or mismatched:
        ours = f"{resnet.name} (width {resnet.width})"
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, first: {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, first: {', '.join(unexpected[:5])}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (file vs model), first: "
                         f"{'; '.join(mismatched[:5])}")
        raise UserError(f"backbone weights {path} do not fit: "
                        f"{describe_resnet_checkpoint(given)} weights given to a {ours} backbone; "
                        + "; ".join(parts))
    result = resnet.load_state_dict(given, strict=False)
    leftover = [k for k in result.missing_keys if not _is_ignored(k)] + list(result.unexpected_keys)
    if leftover:  # cannot happen after the checks above; kept as a guard
        raise UserError(f"backbone weights {path}: keys not loaded: {', '.join(leftover[:5])}")
