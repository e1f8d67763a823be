"""model.init_boxes=dense: the dense head's loss against a location-by-location reference, the
proposal selection (peaks, carried slots, padding), and the model path (training, inference,
export's refusal)."""

import math

import pytest
import torch

from efficientvis.errors import UserError
from efficientvis.training import checkpoint
from efficientvis.training.config import LossConfig, load_config
from efficientvis.training.dense_proposals import dense_proposal_loss, location_centres, select_proposals
from efficientvis.training.model import build_model

SMALL = ["model.hidden_dim=32", "model.num_queries=4", "model.num_iterations=2", "model.backbone_width=8",
         "model.clip_length=4", "model.ffn_dim=64", "model.dynamic_dim=8", "model.init_boxes=dense"]


def _target(T=3, H=64, W=96):
    """Three tracks: a moving box, one absent in frame 0, and one smaller than a stride-8 cell
    that holds no cell centre (it keeps the cell of its centre as its one positive)."""
    boxes = torch.zeros(3, T, 4)
    present = torch.zeros(3, T, dtype=torch.bool)
    for t in range(T):
        boxes[0, t] = torch.tensor([5 + 4 * t, 10, 35 + 4 * t, 30.0])
        boxes[2, t] = torch.tensor([41.0, 49.0, 46.0, 54.0])  # centre (43.5, 51.5): cell (5, 6)
        if t > 0:
            boxes[1, t] = torch.tensor([50, 35, 90, 60.0])
    present[0], present[1, 1:], present[2] = True, True, True
    return {"boxes": boxes, "present": present, "labels": torch.tensor([2, 0, 1]),
            "frame_valid": torch.ones(T, dtype=torch.bool), "image_size": (H, W)}


def _reference_loss(objectness, sides, stride, targets, alpha=0.25, gamma=2.0):
    """The documented rule, one location and one box at a time."""
    BT, h, w = objectness.shape
    T = BT // len(targets)
    focal, box, positives = 0.0, 0.0, 0
    for b, target in enumerate(targets):
        for t in range(T):
            if not target["frame_valid"][t]:
                continue
            for i in range(h):
                for j in range(w):
                    x, y = (j + 0.5) * stride, (i + 0.5) * stride
                    best = None
                    for g in range(len(target["labels"])):
                        if not target["present"][g, t]:
                            continue
                        x1, y1, x2, y2 = target["boxes"][g, t].tolist()
                        dx, dy = abs(x - (x1 + x2) / 2), abs(y - (y1 + y2) / 2)
                        inside = x1 < x < x2 and y1 < y < y2
                        own_cell = dx <= stride / 2 and dy <= stride / 2
                        if dx < 1.5 * stride and dy < 1.5 * stride and (inside or own_cell):
                            area = (x2 - x1) * (y2 - y1)
                            if best is None or area < best[0]:
                                best = (area, (x1, y1, x2, y2))
                    label = 1.0 if best else 0.0
                    p = 1 / (1 + math.exp(-float(objectness[b * T + t, i, j])))
                    ce = -(label * math.log(p) + (1 - label) * math.log(1 - p))
                    p_t = p * label + (1 - p) * (1 - label)
                    focal += (alpha * label + (1 - alpha) * (1 - label)) * ce * (1 - p_t) ** gamma
                    if best:
                        positives += 1
                        left, top, right, bottom = sides[b * T + t, :, i, j].tolist()
                        px1, py1, px2, py2 = x - left, y - top, x + right, y + bottom
                        gx1, gy1, gx2, gy2 = best[1]
                        iw = max(0.0, min(px2, gx2) - max(px1, gx1))
                        ih = max(0.0, min(py2, gy2) - max(py1, gy1))
                        union = (px2 - px1) * (py2 - py1) + (gx2 - gx1) * (gy2 - gy1) - iw * ih
                        hull = (max(px2, gx2) - min(px1, gx1)) * (max(py2, gy2) - min(py1, gy1))
                        box += 1 - (iw * ih / union - (hull - union) / hull)
    return (focal + box) / max(positives, 1), positives


def test_dense_loss_against_a_location_by_location_reference():
    first, second = _target(), _target()
    first["frame_valid"] = torch.tensor([True, True, False])
    second["boxes"][0] += 8.0  # shifted: other locations are positive
    gen = torch.Generator().manual_seed(0)
    objectness = torch.randn(6, 8, 12, generator=gen)
    sides = torch.rand(6, 4, 8, 12, generator=gen) * 30 + 1
    loss = dense_proposal_loss(objectness, sides, 8, [first, second], LossConfig())
    expected, positives = _reference_loss(objectness, sides, 8, [first, second])
    assert positives > 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    empty = {**second, "boxes": torch.zeros(0, 3, 4), "present": torch.zeros(0, 3, dtype=torch.bool),
             "labels": torch.zeros(0, dtype=torch.long)}  # a clip with no track: all negatives
    loss = dense_proposal_loss(objectness, sides, 8, [first, empty], LossConfig())
    assert loss.item() == pytest.approx(_reference_loss(objectness, sides, 8, [first, empty])[0], rel=1e-5)


def test_a_perfect_head_has_no_loss_and_tiny_boxes_keep_one_positive():
    target = _target(T=2)
    _, positives = _reference_loss(torch.zeros(2, 8, 12), torch.ones(2, 4, 8, 12), 8, [target])
    centres = location_centres(8, 12, 8, "cpu")  # (96, 2)
    objectness = torch.full((2, 8, 12), -30.0)
    sides = torch.ones(2, 4, 96)
    count = 0
    for t in range(2):
        for g in (2, 0, 1):  # smallest box first: a location inside two boxes takes the smaller
            if not target["present"][g, t]:
                continue
            x1, y1, x2, y2 = target["boxes"][g, t]
            c = (torch.stack([x1 + x2, y1 + y2]) / 2)
            offset = (centres - c).abs()
            inside = (centres[:, 0] > x1) & (centres[:, 0] < x2) & (centres[:, 1] > y1) & (centres[:, 1] < y2)
            near = (offset < 12).all(1) & (inside | (offset <= 4).all(1)) & (objectness[t].flatten() < 0)
            if g == 2:
                assert near.sum() == 1  # the 5x5 box: only the cell of its centre
            objectness[t].view(-1)[near] = 30.0
            sides[t, :, near] = torch.stack([centres[near, 0] - x1, centres[near, 1] - y1,
                                             x2 - centres[near, 0], y2 - centres[near, 1]])
            count += int(near.sum())
    assert count == positives
    perfect = dense_proposal_loss(objectness, sides.reshape(2, 4, 8, 12), 8, [target], LossConfig())
    assert perfect.item() < 1e-6
    sides[0, 0] += 4.0  # boxes 4 px too wide on the left: GIoU loss
    assert dense_proposal_loss(objectness, sides.reshape(2, 4, 8, 12), 8, [target], LossConfig()) > 0.01


def test_proposals_are_the_peaks_best_first_and_carried_slots_keep_their_box():
    T, h, w, stride = 2, 8, 12, 8
    objectness = torch.full((T, h, w), -8.0)
    peaks = {(1, 2): 6.0, (5, 8): 4.0, (3, 5): 2.0, (6, 1): 1.0}  # (row, col): logit
    for (i, j), logit in peaks.items():
        objectness[:, i, j] = logit
    objectness[:, 4, 5] = 1.5  # a neighbour of (3, 5): not a peak of its own
    objectness[:, 7, 11] = 9.0  # beyond the image (rows 0..6, cols 0..9 are inside): ignored
    sides = torch.full((T, 4, h, w), 5.0)
    sides[1] += 2.0  # frame 1 reads its own boxes
    sizes = torch.tensor([[56.0, 80.0]])

    def box(i, j, t):
        cx, cy, s = (j + 0.5) * stride, (i + 0.5) * stride, 5.0 + 2.0 * t
        return torch.minimum(torch.tensor([cx - s, cy - s, cx + s, cy + s]).clamp(min=0),
                             torch.tensor([80.0, 56.0, 80.0, 56.0]))  # clipped to the image

    got = select_proposals(objectness, sides, stride, 4, sizes)  # (1, 4, T, 4)
    for slot, (i, j) in enumerate([(1, 2), (5, 8), (3, 5), (6, 1)]):
        for t in range(T):
            torch.testing.assert_close(got[0, slot, t], box(i, j, t))
    # slot 1 carries a box on the best peak: it keeps it; the free slots take the next peaks
    carried_box = torch.tensor([[[0.0, 0.0, 60.0, 50.0], box(1, 2, 0).tolist(), [0.0] * 4, [0.0] * 4]])
    active = torch.tensor([[False, True, False, False]])
    got = select_proposals(objectness, sides, stride, 4, sizes, (active, carried_box))
    torch.testing.assert_close(got[0, 1], carried_box[0, 1].expand(T, 4))
    for slot, (i, j) in zip((0, 2, 3), [(5, 8), (3, 5), (6, 1)]):
        torch.testing.assert_close(got[0, slot, 0], box(i, j, 0))


def test_dense_model_trains_infers_and_exports(tmp_path):
    """The head trains with the backbone; inference runs it without a loss; `evis export` puts the
    head and the peak selection into stage_0 and checks the ONNX graphs against PyTorch at another
    T, H, W than traced, with carried and free slots (export/export.py verify_export)."""
    from efficientvis.export.export import export_model

    cfg = load_config("tiny", SMALL + ["model.carry_proposals=true"])
    model = build_model(cfg.model).train()
    assert model.init_boxes is None
    frames = torch.randint(0, 255, (1, 4, 3, 64, 96), dtype=torch.uint8)
    out = model(frames)
    objectness, sides, stride = out["dense"]
    assert objectness.shape == (4, 8, 12) and sides.shape == (4, 4, 8, 12) and stride == 8
    dense_proposal_loss(objectness, sides, stride, [_target(T=4)], cfg.loss).backward()
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert model.dense_proposals.objectness.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(frames)
        assert "dense" not in out
        head = model.dense_proposals(model.features(frames))
        start = select_proposals(*head, 8, 4, torch.tensor([[64.0, 96.0]]))
        torch.testing.assert_close(model.iterate(model.features(frames), model.initial_queries(1, 4), start)[-1]
                                   ["boxes"], out["stages"][-1]["boxes"])
    path = str(tmp_path / "dense.pt")
    checkpoint.save(path, model=model.state_dict(), config=cfg.to_dict(), class_names=["a"] * 6)
    with pytest.raises(UserError, match="dense_level must be an FPN level 0..3"):
        build_model(load_config("tiny", SMALL + ["model.dense_level=4"]).model)
    manifest = export_model(path, str(tmp_path / "onnx"), max_clip=4, log=lambda *a: None)
    assert manifest["model"]["init_boxes"] == "dense"
    assert manifest["verification"]["max_abs_error"]["stage_0"]["proposals"] < 0.01  # in pixels
