"""ResNet + FPN backbone: torchvision key layout, checkpoint loading, shapes, freezing, normalisation."""

import math

import pytest
import torch
from torch import nn

from efficientvis.errors import UserError
from efficientvis.training.backbone import (Backbone, FrozenBatchNorm2d, build_backbone,
                                            load_backbone_weights)

# torchvision's documented layout: (block, blocks per stage, published parameter count incl. fc)
TORCHVISION = {
    "resnet18": ("basic", (2, 2, 2, 2), 11_689_512),
    "resnet34": ("basic", (3, 4, 6, 3), 21_797_672),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 25_557_032),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 44_549_160),
}


def _bn(prefix):
    return [f"{prefix}.{n}" for n in ("weight", "bias", "running_mean", "running_var",
                                      "num_batches_tracked")]


def torchvision_resnet_keys(name):
    """The state_dict keys of torchvision.models.<name>() (written from its source layout)."""
    kind, layers, _ = TORCHVISION[name]
    keys = ["conv1.weight", *_bn("bn1")]
    for stage, blocks in enumerate(layers, 1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            for c in range(1, (2 if kind == "basic" else 3) + 1):
                keys += [f"{p}.conv{c}.weight", *_bn(f"{p}.bn{c}")]
            if b == 0 and (stage > 1 or kind == "bottleneck"):
                keys += [f"{p}.downsample.0.weight", *_bn(f"{p}.downsample.1")]
    return keys + ["fc.weight", "fc.bias"]


def torchvision_style_checkpoint(backbone, seed=0):
    """A fake torchvision checkpoint of ``backbone.body``: random values, plus fc.* and every
    bn*.num_batches_tracked, as torchvision writes them."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in backbone.body.state_dict().items()}
    for k in list(sd):
        if k.endswith("running_var"):
            sd[k] = sd[k].abs() + 0.5
            sd[k.replace("running_var", "num_batches_tracked")] = torch.tensor(1000)
    sd["fc.weight"] = torch.randn(1000, backbone.body.out_channels[-1], generator=g)
    sd["fc.bias"] = torch.randn(1000, generator=g)
    return sd


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_every_depth_has_torchvision_keys_and_sizes(name):
    model = build_backbone(name)
    ours = list(model.body.state_dict())
    expected = torchvision_resnet_keys(name)
    ignored = [k for k in expected if k.startswith("fc.") or k.endswith("num_batches_tracked")]
    assert sorted(ours) == sorted(set(expected) - set(ignored))
    # parameter count (FrozenBN weight/bias are buffers here) + fc == torchvision's published count
    n = sum(v.numel() for k, v in model.body.state_dict().items()
            if not k.endswith(("running_mean", "running_var")))
    fc = model.body.out_channels[-1] * 1000 + 1000
    assert n + fc == TORCHVISION[name][2]
    assert model.body.out_channels[-1] == (512 if TORCHVISION[name][0] == "basic" else 2048)


def test_load_torchvision_checkpoint_strict(tmp_path):
    wrappers = [lambda s: s, lambda s: {"state_dict": s}, lambda s: {"model": s},
                lambda s: {f"module.{k}": v for k, v in s.items()}]
    for i, wrap in enumerate(wrappers):
        width = 64 if i == 0 else 16  # the real torchvision width once; small files for the rest
        sd = torchvision_style_checkpoint(build_backbone("resnet18", width=width, fpn_channels=8))
        path = tmp_path / f"r18_{i}.pth"
        torch.save(wrap(sd), path)
        fresh = build_backbone("resnet18", width=width, fpn_channels=8, weights=path)
        for k, v in fresh.body.state_dict().items():
            torch.testing.assert_close(v, sd[k], rtol=0, atol=0)


def test_wrong_depth_or_width_is_a_clear_user_error(tmp_path):
    r50 = tmp_path / "resnet50-imagenet.pth"
    torch.save(torchvision_style_checkpoint(build_backbone("resnet50", width=16, fpn_channels=8)), r50)
    with pytest.raises(UserError) as e:
        build_backbone("resnet18", width=16, fpn_channels=8, weights=r50)
    msg = str(e.value)
    assert str(r50) in msg and "resnet50" in msg and "resnet18" in msg
    assert "layer1.0.conv3.weight" in msg  # first offending keys are named

    half = tmp_path / "r18-width32.pth"
    torch.save(torchvision_style_checkpoint(build_backbone("resnet18", width=32, fpn_channels=8)), half)
    with pytest.raises(UserError, match="shape mismatch") as e:
        load_backbone_weights(build_backbone("resnet18", fpn_channels=16), half)
    assert "conv1.weight (32, 3, 7, 7) vs (64, 3, 7, 7)" in str(e.value)

    missing = tmp_path / "partial.pth"
    sd = torchvision_style_checkpoint(build_backbone("resnet18", width=16, fpn_channels=8))
    del sd["layer4.1.bn2.running_var"]
    torch.save(sd, missing)
    with pytest.raises(UserError, match="layer4.1.bn2.running_var"):
        build_backbone("resnet18", width=16, fpn_channels=8, weights=missing)

    with pytest.raises(UserError, match="not found"):
        build_backbone("resnet18", weights=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth"):
        build_backbone("resnet18", weights=junk)


@pytest.mark.parametrize("name,width,fpn", [("resnet18", 16, 32), ("resnet50", 8, 24)])
def test_fpn_shapes_odd_sizes(name, width, fpn):
    model = build_backbone(name, width=width, fpn_channels=fpn).eval()
    assert model.body.conv1.weight.shape == (width, 3, 7, 7)
    for H, W in [(97, 131), (64, 96), (33, 45), (193, 321)]:
        with torch.no_grad():
            feats = model(torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8))
        assert [tuple(f.shape) for f in feats] == [
            (2, fpn, math.ceil(H / s), math.ceil(W / s)) for s in (4, 8, 16, 32)]
    assert model.strides == (4, 8, 16, 32) and model.out_channels == fpn


def test_unknown_name_and_bad_options():
    with pytest.raises(UserError, match="resnet50"):
        build_backbone("resnet42")
    with pytest.raises(UserError):
        build_backbone("resnet18", freeze_at=3)
    with pytest.raises(UserError):
        build_backbone("resnet18", norm="gn")


def test_frozen_bn_and_freeze_at():
    for freeze_at in (0, 1, 2):
        model = build_backbone("resnet18", width=8, fpn_channels=8, freeze_at=freeze_at)
        bns = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
        assert bns and all(not list(m.parameters()) for m in bns)  # no trainable params
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        trainable = {k for k, p in model.body.named_parameters() if p.requires_grad}
        assert ("conv1.weight" in trainable) == (freeze_at < 1)
        assert ("layer1.0.conv1.weight" in trainable) == (freeze_at < 2)
        assert "layer2.0.conv1.weight" in trainable
        assert all(p.requires_grad for p in model.fpn.parameters())
    # norm="bn": trainable BatchNorm2d in the trained stages, frozen ones where frozen
    model = build_backbone("resnet18", width=8, fpn_channels=8, freeze_at=2, norm="bn")
    assert isinstance(model.body.bn1, FrozenBatchNorm2d)
    assert isinstance(model.body.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(model.body.layer2[0].bn1, nn.BatchNorm2d)


def test_frozen_bn_equals_eval_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.2, 3)
    x = torch.randn(2, 5, 7, 9)
    torch.testing.assert_close(FrozenBatchNorm2d.from_batchnorm(bn)(x), bn.eval()(x))
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked accepted and ignored
    torch.testing.assert_close(frozen(x), bn(x))


def test_uint8_input_equals_normalised_float():
    torch.manual_seed(0)
    model = build_backbone("resnet18", width=8, fpn_channels=8).eval()
    img = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(img), (img.float() / 255 - mean) / std,
                               rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        a, b = model(img), model(img.float())
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # the normalisation constants are buffers that follow .to() but are not checkpointed
    assert "pixel_mean" in dict(model.named_buffers()) and "pixel_mean" not in model.state_dict()


def test_backbone_trains():
    model = build_backbone("resnet18", width=8, fpn_channels=8, norm="bn")
    feats = model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    sum(f.square().mean() for f in feats).backward()
    assert model.body.layer4[1].conv2.weight.grad is not None
    assert model.body.conv1.weight.grad is None  # frozen stem
    assert isinstance(model, Backbone)
