"""Matching, losses and the training machinery (resume, DDP on gloo, errors, overfitting)."""

import csv
import math
import os
import subprocess
import sys

import pytest
import torch

from efficientvis.cli import main
from efficientvis.errors import UserError
from efficientvis.training import checkpoint
from efficientvis.training.config import LossConfig, load_config
from efficientvis.training.losses import TrackletCriterion, clip_loss_terms, semantic_loss
from efficientvis.training.matcher import crop_target_masks, extend_assignment, match_clip
from efficientvis.training.model import build_model
from efficientvis.training.train import budgeted_steps, clips_per_sample, lead_clips, lr_factor
from efficientvis.ytvis import synth

SMALL = ["model.hidden_dim=32", "model.num_queries=4", "model.num_iterations=2", "model.backbone_width=8",
         "model.clip_length=4", "model.ffn_dim=64", "model.dynamic_dim=8", "data.train_sizes=96",
         "data.test_size=96", "data.max_size=160", "data.num_workers=0", "train.warmup_iters=20",
         "train.log_every=1", "train.eval_every=0"]


def _target(T=3, H=64, W=96):
    """Two ground-truth tracks; the second is absent in frame 0."""
    masks = torch.zeros(2, T, H, W, dtype=torch.uint8)
    boxes = torch.zeros(2, T, 4)
    for t in range(T):
        masks[0, t, 10:30, 5 + 4 * t:35 + 4 * t] = 1
        boxes[0, t] = torch.tensor([5 + 4 * t, 10, 35 + 4 * t, 30.0])
        if t > 0:
            masks[1, t, 35:60, 50:90] = 1
            boxes[1, t] = torch.tensor([50, 35, 90, 60.0])
    return {"masks": masks, "boxes": boxes, "present": masks.flatten(2).amax(-1) > 0,
            "labels": torch.tensor([2, 0]), "frame_valid": torch.ones(T, dtype=torch.bool),
            "image_size": (H, W)}


def _perfect_outputs(target, slots, N=4, K=3):
    """Predictions where query slots[j] reproduces ground truth j exactly; other slots are empty."""
    T = target["masks"].shape[1]
    logits = torch.full((N, T, K), -8.0)
    boxes = torch.tensor([0, 0, 8, 8.0]).expand(N, T, 4).clone()
    mask_logits = torch.full((N, T, 28, 28), -8.0)
    for j, slot in enumerate(slots):
        boxes[slot] = torch.where(target["present"][j][:, None], target["boxes"][j], boxes[slot])
        logits[slot, target["present"][j], target["labels"][j]] = 8.0
        crops = crop_target_masks(target["masks"][j:j + 1], boxes[slot][:, None], 28)[:, 0, 0]
        mask_logits[slot] = torch.where(crops >= 0.5, 8.0, -8.0)
    return {"class_logits": logits, "boxes": boxes, "mask_logits": mask_logits}


def test_matcher_recovers_the_assignment_and_perfect_predictions_cost_little():
    target = _target()
    out = _perfect_outputs(target, slots=[3, 1])
    q, g = match_clip(out, target, LossConfig())
    assert dict(zip(g.tolist(), q.tolist())) == {0: 3, 1: 1}
    terms, counts = clip_loss_terms(out, target, (q, g), LossConfig())
    assert counts["visible"] == 5  # 3 + 2 visible (track, frame) entries
    assert terms["l1"] < 1e-6 and terms["giou"] < 1e-5
    assert terms["dice"] / counts["visible"] < 0.02
    assert terms["class"] / counts["visible"] < 0.01
    # a wrong assignment costs more on every term
    wrong, _ = clip_loss_terms(out, target, (torch.tensor([0, 2]), g), LossConfig())
    for k in ("class", "l1", "giou", "dice"):
        assert wrong[k] > terms[k] + 0.1


def test_second_clip_keeps_the_first_assignment_and_gives_free_slots_to_new_tracks():
    target = _target()
    first = (torch.tensor([2]), torch.tensor([0]))  # the first clip only saw track 0, in slot 2
    out = _perfect_outputs(target, slots=[2, 0])
    q, g = extend_assignment(out, target, LossConfig(), first)
    assert dict(zip(g.tolist(), q.tolist())) == {0: 2, 1: 0}
    # even when the slot that fits track 0 best is elsewhere, the first clip's choice stands
    out = _perfect_outputs(target, slots=[1, 0])
    q, g = extend_assignment(out, target, LossConfig(), first)
    assert dict(zip(g.tolist(), q.tolist()))[0] == 2


def test_absent_frames_are_background_and_supervise_empty_masks():
    target = _target()
    out = _perfect_outputs(target, slots=[0, 1])
    # slot 1 predicts the object also in frame 0, where ground truth 1 is absent
    out["class_logits"][1, 0, 0] = 8.0
    out["mask_logits"][1, 0] = 8.0
    terms, _ = clip_loss_terms(out, target, (torch.tensor([0, 1]), torch.tensor([0, 1])), LossConfig())
    clean, _ = clip_loss_terms(_perfect_outputs(target, slots=[0, 1]), target,
                               (torch.tensor([0, 1]), torch.tensor([0, 1])), LossConfig())
    assert terms["class"] > clean["class"] + 1.0
    assert terms["mask_bce"] > clean["mask_bce"] + 1.0
    assert torch.isclose(terms["dice"], clean["dice"])  # dice counts visible frames only


def test_semantic_loss_against_a_per_pixel_reference():
    """model.semantic_head's dense loss: per P2 cell, the target of class k is the fraction of the
    cell covered by objects of class k; focal loss summed over the valid frames of every clip of
    the batch, divided by the positive mass. Checked against a cell-by-cell loop."""
    first = _target(T=3, H=64, W=96)
    first["labels"] = torch.tensor([2, 2])  # one class twice: overlaps count once
    first["masks"][1, 1, 20:40, 20:40] = 1  # overlaps track 0 in frame 1
    first["frame_valid"] = torch.tensor([True, True, False])
    second = _target(T=3, H=64, W=96)  # classes 2 and 0
    K, h, w = 3, 16, 24
    logits = torch.randn(6, K, h, w, generator=torch.Generator().manual_seed(0))  # (B*T, K, h, w)
    loss = semantic_loss(logits, [first, second], LossConfig())

    total, positive = 0.0, 0.0
    for b, target in enumerate([first, second]):
        for t in range(3):
            if not target["frame_valid"][t]:
                continue
            for k in range(K):
                union = torch.zeros(64, 96)
                for g in range(len(target["labels"])):
                    if target["labels"][g] == k:
                        union = torch.maximum(union, target["masks"][g, t].float())
                for i in range(h):
                    for j in range(w):
                        y = float(union[4 * i:4 * i + 4, 4 * j:4 * j + 4].mean())
                        p = 1 / (1 + math.exp(-float(logits[3 * b + t, k, i, j])))
                        ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
                        p_t = p * y + (1 - p) * (1 - y)
                        total += (0.25 * y + 0.75 * (1 - y)) * ce * (1 - p_t) ** 2
                        positive += y
    assert loss.item() == pytest.approx(total / positive, rel=1e-5)


def test_semantic_head_trains_the_backbone_and_stays_out_of_inference():
    cfg = load_config("tiny", SMALL + ["model.semantic_head=true"])
    model = build_model(cfg.model).train()
    frames = torch.randint(0, 255, (1, 4, 3, 64, 96), dtype=torch.uint8)
    out = model(frames)
    assert out["semantic_logits"].shape == (4, cfg.model.num_classes, 16, 24)
    out["semantic_logits"].sum().backward()
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0
    with torch.no_grad():  # a lead clip (no loss) and inference skip the head
        assert "semantic_logits" not in model(frames)
    assert "semantic_logits" not in model.eval()(frames)


def test_varifocal_class_target_is_the_box_iou():
    """loss.class_loss=varifocal: the matched slot's true-class score is pulled towards the IoU of
    its box in each frame (not towards 1), so scores rank localisation quality."""
    target = _target()
    out = _perfect_outputs(target, slots=[0, 1])
    out["boxes"][0, :, 2] = out["boxes"][0, :, 0] + 15.0  # track 0: half as wide -> IoU 0.5
    cfg = LossConfig(class_loss="varifocal")
    q_g = (torch.tensor([0, 1]), torch.tensor([0, 1]))

    def grad_at(p):  # d(class loss)/d(logit) of slot 0's true class in frame 1, at probability p
        logits = out["class_logits"].clone()
        logits[0, 1, 2] = torch.logit(torch.tensor(p))
        logits.requires_grad_(True)
        terms, _ = clip_loss_terms({**out, "class_logits": logits}, target, q_g, cfg)
        terms["class"].backward()
        return float(logits.grad[0, 1, 2])

    assert grad_at(0.3) < 0 < grad_at(0.7)  # the minimum is at IoU 0.5
    assert abs(grad_at(0.5)) < 1e-6
    terms, _ = clip_loss_terms(out, target, q_g, cfg)
    perfect, _ = clip_loss_terms(_perfect_outputs(target, slots=[0, 1]), target, q_g, cfg)
    assert perfect["class"] < terms["class"]
    with pytest.raises(UserError, match="class_loss must be one of focal, varifocal"):
        TrackletCriterion(LossConfig(class_loss="softmax"))


def test_soft_mask_targets_are_the_crop_fractions():
    """loss.mask_targets=soft: a boundary running through a mask cell is a fractional target, so
    the BCE is lowest at the crop's own values, where the hard target pulls them to 0 or 1."""
    target = _target()
    target["masks"][0, :, 30, :] = 1  # one more row: a 21-px tall object over 28 cells
    out = _perfect_outputs(target, slots=[0, 1])
    q_g = (torch.tensor([0, 1]), torch.tensor([0, 1]))
    crops = crop_target_masks(target["masks"][:1], out["boxes"][0][:, None], 28)[:, 0, 0]  # (T, 28, 28)
    fractional = (crops > 0.01) & (crops < 0.99)
    assert fractional.any()
    at_crop = {**out, "mask_logits": out["mask_logits"].clone()}
    at_crop["mask_logits"][0] = torch.logit(crops.clamp(1e-4, 1 - 1e-4))
    soft, hard = LossConfig(mask_targets="soft"), LossConfig(mask_targets="hard")
    bce = lambda outputs, cfg: clip_loss_terms(outputs, target, q_g, cfg)[0]["mask_bce"]  # noqa: E731
    assert bce(at_crop, soft) < bce(out, soft)
    assert bce(out, hard) < bce(at_crop, hard)
    with pytest.raises(UserError, match="mask_targets must be one of hard, soft"):
        TrackletCriterion(LossConfig(mask_targets="fuzzy"))


def test_criterion_supervises_every_iteration():
    target = _target()
    stage = {k: v[None] for k, v in _perfect_outputs(target, slots=[0, 1]).items()}
    loss, logs, final = TrackletCriterion(LossConfig())({"stages": [stage, stage]}, [target])
    assert {"class_0", "class_1", "dice_1"} <= set(logs)
    assert len(final) == 1 and len(final[0][0]) == 2


def test_denoising_tracklets_follow_the_ground_truth():
    from efficientvis.training.denoising import noised_tracklet_boxes

    target = _target(T=4)
    target["present"][1, 3] = False  # track 1: absent in frames 0 and 3
    target["box_noise"] = torch.zeros(2, 4, 4)
    exact, tracks = noised_tracklet_boxes(target, 0.4)
    assert tracks.tolist() == [0, 1]
    assert torch.equal(exact[0], target["boxes"][0])  # zero noise: the boxes themselves
    assert torch.equal(exact[1, 0], target["boxes"][1, 1]) and torch.equal(exact[1, 3], target["boxes"][1, 2])
    target["box_noise"] = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noised, _ = noised_tracklet_boxes(target, 0.4)
    H, W = target["image_size"]
    assert (noised >= 0).all() and (noised[..., 0::2] <= W).all() and (noised[..., 1::2] <= H).all()
    size = exact[..., 2:] - exact[..., :2]
    centre_shift = ((noised[..., :2] + noised[..., 2:]) - (exact[..., :2] + exact[..., 2:])).abs() / 2
    assert (centre_shift <= 0.2 * size + 1e-4).all() and not torch.equal(noised, exact)
    # no visible track, nothing to denoise
    target["present"][:] = False
    assert noised_tracklet_boxes(target, 0.4)[0].shape == (0, 4, 4)


def test_denoising_loss_is_small_for_perfect_tracklets_and_needs_no_matching():
    target = _target()
    crit = TrackletCriterion(LossConfig())
    perfect = {k: v[None] for k, v in _perfect_outputs(target, slots=[0, 1], N=2).items()}
    swapped = {k: v[None] for k, v in _perfect_outputs(target, slots=[1, 0], N=2).items()}
    tracks = [torch.tensor([0, 1])]
    good, logs = crit.denoising([[perfect, perfect]], [target], tracks, 2)
    bad, _ = crit.denoising([[swapped, swapped]], [target], tracks, 2)
    assert {"dn_class_0", "dn_giou_1"} <= set(logs)
    assert float(good) < 0.05 * float(bad)  # tracklet j is ground truth j: a swap is not matched away
    empty, _ = crit.denoising([None], [target], [torch.zeros(0, dtype=torch.int64)], 2)
    assert float(empty) == 0.0


def test_denoising_negatives_sit_further_off_and_learn_background():
    from efficientvis.training.denoising import noised_tracklet_boxes

    target = _target(T=4)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0]).expand(2, 4, 4)
    target["box_noise"] = signs * 0.5
    target["negative_noise"] = signs * 0.5  # magnitude 1.5 once mapped to [1, 2]
    positives, tracks = noised_tracklet_boxes(target, 0.2)
    both, same_tracks = noised_tracklet_boxes(target, 0.2, negatives=True)
    assert torch.equal(both[:2], positives) and torch.equal(same_tracks, tracks) and both.shape == (4, 4, 4)
    exact, _ = noised_tracklet_boxes(dict(target, box_noise=torch.zeros(2, 4, 4)), 0.2)
    exact = torch.cat([exact, exact])
    size = exact[..., 2:] - exact[..., :2]
    shift = (both[..., :2] + both[..., 2:] - exact[..., :2] - exact[..., 2:]).abs() / 2  # centre shift
    H, W = target["image_size"]
    inside = (both > 0).all(-1) & (both[..., 2] < W) & (both[..., 3] < H)  # not clipped to the image
    assert inside[:2].sum() >= 4 and inside[2:].sum() >= 4
    expected = torch.cat([0.05 * size[:2], 0.15 * size[2:]])  # 0.5 * 0.2 / 2 and 1.5 * 0.2 / 2 of the size
    assert torch.allclose(shift[inside], expected[inside], atol=1e-4)
    # the loss: tracklet j < G' is ground truth j, the negatives after them are background
    crit = TrackletCriterion(LossConfig(denoising_negatives=True, denoising_noise=0.2))
    perfect = _perfect_outputs(target, slots=[0, 1], N=4)
    fired = {k: v.clone() for k, v in perfect.items()}
    fired["class_logits"][2:] = fired["class_logits"][:2]  # negatives claiming the objects
    good, _ = crit.denoising([[{k: v[None] for k, v in perfect.items()}]], [target], [tracks], 1)
    bad, logs = crit.denoising([[{k: v[None] for k, v in fired.items()}]], [target], [tracks], 1)
    assert float(good) < 0.05 * float(bad) and logs["dn_class_0"] > 1.0
    with pytest.raises(UserError, match="denoising_noise < 0.5"):
        TrackletCriterion(LossConfig(denoising_negatives=True, denoising_noise=0.6))


def test_lr_schedule_and_correspondence_rule():
    assert lr_factor(0, 100, [500]) == pytest.approx(0.001)
    assert lr_factor(100, 100, [500]) == 1.0
    assert lr_factor(500, 100, [500, 800]) == pytest.approx(0.1)
    cosine = [lr_factor(s, 100, [], "cosine", 1100) for s in (100, 600, 1100, 1200)]
    assert cosine == pytest.approx([1.0, 0.505, 0.01, 0.01])  # half-way: mean of 1 and 0.01
    cfg = load_config("tiny", ["data.lead_clips=0"])
    assert clips_per_sample(cfg, cfg.model.clip_length + 1) == 2  # the paper's pairs
    assert clips_per_sample(cfg, cfg.model.clip_length) == 1
    assert clips_per_sample(load_config("tiny"), 100) == 3  # the tiny recipe: a pair and a lead clip
    assert clips_per_sample(load_config("tiny", ["data.correspondence_clips=3"]), 100) == 4  # + the lead clip
    lead = load_config("tiny", ["data.lead_clips=2"])
    assert clips_per_sample(lead, 100) == 4  # a trained pair and up to 2 clips run before it
    assert [lead_clips(lead, step, 4) for step in range(5)] == [0, 1, 2, 0, 1]
    assert lead_clips(lead, 1, 1) == 0  # no chains without correspondence learning
    cfg = load_config("tiny", ["data.correspondence=off"])  # YAML 1.1 reads a bare off as false
    assert cfg.data.correspondence == "off" and clips_per_sample(cfg, 100) == 1
    assert load_config("tiny", ["data.correspondence=on"]).data.correspondence == "on"
    with pytest.raises(UserError, match="correspondence_clips must be >= 2"):
        clips_per_sample(load_config("tiny", ["data.correspondence_clips=1"]), 100)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synth.generate(str(root), 4, frames=8, height=96, width=160, seed=5, max_objects=2, workers=1,
                   valid_videos=2)
    return str(root)


def _train(data, out, *settings, resume=False):
    args = ["train", "--config", "tiny", "--data", data, "--out", out, "--threads", "1"]
    for item in SMALL + ["train.samples_per_epoch=4", "train.batch_size=1", *settings]:
        args += ["--set", item]
    return main(args + (["--resume"] if resume else []))


def test_resume_continues_exactly(small_data, tmp_path):
    """Also trains on chains of 3 clips (correspondence learning over two query-feedback hops),
    started every other step from the queries of a lead clip (data.lead_clips), and keeps a
    weight average (train.ema_decay) that a resume restores."""
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    chain = ["data.correspondence_clips=3", "data.lead_clips=1", "train.ema_decay=0.9", "train.ema_warmup_steps=1"]
    assert _train(small_data, straight, "train.epochs=2", *chain) == 0
    assert _train(small_data, split, "train.epochs=1", *chain) == 0
    # as if killed after logging two steps past its last checkpoint (step 4): resuming drops them
    with open(os.path.join(straight, "train.csv")) as f:
        straight_rows = list(csv.DictReader(f))
    with open(os.path.join(split, "train.csv"), "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(straight_rows[0])).writerows(straight_rows[4:6])
        f.write("7,1,0.00")  # and a row cut short by the kill
    assert _train(small_data, split, "train.epochs=2", *chain, resume=True) == 0
    a = checkpoint.load(os.path.join(straight, "final.pt"))["model"]
    b = checkpoint.load(os.path.join(split, "final.pt"))["model"]
    assert checkpoint.load(os.path.join(split, "final.pt"))["step"] == 8
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    # final.pt holds the average, last.pt the weights (and the average, which a resume restores)
    last = checkpoint.load(os.path.join(split, "last.pt"))
    assert not torch.allclose(last["model"]["init_queries.weight"], a["init_queries.weight"])
    torch.testing.assert_close(last["ema"]["init_queries.weight"], a["init_queries.weight"])
    with open(os.path.join(split, "train.csv")) as f:
        split_rows = list(csv.DictReader(f))
    assert [r["step"] for r in split_rows] == [str(s) for s in range(1, 9)]
    for a_row, b_row in zip(straight_rows, split_rows):  # the logs too, as if never stopped
        assert abs(float(a_row["loss"]) - float(b_row["loss"])) < 1e-4 * float(a_row["loss"]), (a_row, b_row)


def test_weight_average_follows_its_formula():
    from efficientvis.training.ema import ModelEMA

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, warmup_steps=10)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 4):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model.train()(torch.randn(4, 3))  # moves BatchNorm's running statistics and its counter
        ema.update(model, step)
        d = 0.9 * (1 - math.exp(-step / 10))
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, expected[k], msg=k)
    assert ema.state_dict()["1.num_batches_tracked"] == 3
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(UserError, match="ema_decay"):
        ModelEMA(model, decay=1.0)


def test_time_budget_fits_the_schedule_and_a_resume_keeps_it(small_data, tmp_path):
    # 1.2 s/step, 50 steps done in 60 s: 27 min (x 0.97 margin) leave 1511 s, 1259 more steps;
    # capped by the epochs
    assert budgeted_steps(1.2, 60.0, 27, 50, 2000) == 50 + int((27 * 60 * 0.97 - 60) / 1.2)
    assert budgeted_steps(1.2, 60.0, 27, 50, 900) == 900
    assert budgeted_steps(1.2, 60.0, 0.5, 50, 900) == 50  # over budget already: stop now
    out = str(tmp_path / "budget")
    # 1 warm-up step, then 2 timed steps
    budget = ["train.budget_minutes=0.0001", "train.budget_warmup_steps=1", "train.budget_calibration_steps=2",
              "train.epochs=3"]
    assert _train(small_data, out, *budget) == 0  # 3 steps already overrun 6 ms: the schedule ends there
    assert checkpoint.load(os.path.join(out, "last.pt"))["budget_total_steps"] == 3
    assert checkpoint.load(os.path.join(out, "final.pt"))["step"] == 3
    # a resume keeps the fitted length instead of timing 3 more steps to measure again
    assert _train(small_data, out, *budget, resume=True) == 0
    assert checkpoint.load(os.path.join(out, "final.pt"))["step"] == 3


def _lead_chain(small_data, *settings):
    """A tiny model in training mode, its criterion and one (lead clip, trained clip) chain batch."""
    from efficientvis.training import train
    from efficientvis.training.dataset import collate

    cfg = load_config("tiny", SMALL + ["data.lead_clips=1", "loss.denoising_weight=0", *settings])
    cfg.data.root = small_data
    dataset = train.build_train_dataset(cfg, 3)
    cfg.model.num_classes = len(dataset.class_names)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    lead, first = collate([dataset[0], dataset[1]])[:2]
    return model, TrackletCriterion(cfg.loss), lead, first


def test_lead_matching_carries_the_lead_clips_assignment(small_data):
    """data.lead_matching: the first trained clip of a chain is scored with the lead clip's
    assignment (extended to tracks the lead clip did not see), not with a fresh matching."""
    from efficientvis.training import train

    model, criterion, lead, first = _lead_chain(small_data)
    with torch.no_grad():
        lead_out = model(lead["frames"], lead["image_sizes"], masks="last")
        first_out = model(first["frames"], first["image_sizes"], init_queries=lead_out["next_queries"])
    lead_assignment = criterion.assign(lead_out["stages"][-1], lead["targets"])
    expected = {True: criterion(first_out, first["targets"], lead_assignment)[0],
                False: criterion(first_out, first["targets"])[0]}
    assert not torch.isclose(expected[True], expected[False])  # the two assignments differ here
    for lead_matching in (True, False):
        with torch.no_grad():
            loss, _ = train.TrainStep(model, criterion, lead_matching)([lead, first], lead=1, trained=1)
        torch.testing.assert_close(loss, expected[lead_matching])


def test_carried_proposals_go_from_clip_to_clip_in_a_chain(small_data):
    """model.carry_proposals: the trained clip starts from the lead clip's last-frame boxes."""
    from efficientvis.training import train

    model, criterion, lead, first = _lead_chain(small_data, "model.carry_proposals=true",
                                                "model.carry_threshold=0")
    with torch.no_grad():
        lead_out = model(lead["frames"], lead["image_sizes"], masks="none")
        assert lead_out["carried"][0].all()  # threshold 0: every slot carries its box
        runs = {carried: model(first["frames"], first["image_sizes"], init_queries=lead_out["next_queries"],
                               carried=lead_out["carried"] if carried else None) for carried in (True, False)}
        loss, _ = train.TrainStep(model, criterion)([lead, first], lead=1, trained=1)
    expected = {carried: criterion(out, first["targets"])[0] for carried, out in runs.items()}
    assert not torch.isclose(expected[True], expected[False])
    torch.testing.assert_close(loss, expected[True])


def _torchrun(small_data, out, *settings):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "efficientvis", "train", "--config", "tiny", "--data", small_data, "--out", out,
           "--threads", "1"]
    for item in SMALL + ["train.samples_per_epoch=4", "train.batch_size=1", "train.epochs=1", *settings]:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return checkpoint.load(os.path.join(out, "final.pt"))["step"]


def test_torchrun_ddp_on_gloo(small_data, tmp_path):
    assert _torchrun(small_data, str(tmp_path / "ddp")) == 2  # 4 samples, 2 processes, 1 per step each
    # the wall-clock limit under DDP: rank 0's decision stops both processes at the same step (when
    # each rank read its own clock, a 29-minute run stopped one rank a step before the other, which
    # then waited in its all-reduce for ever; timing makes that race hard to force in a test)
    assert _torchrun(small_data, str(tmp_path / "ddp_minutes"), "train.max_minutes=0.00001") == 1


def test_bad_dataset_and_config_give_one_line(small_data, tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "dataset folder not found" in capsys.readouterr().err
    assert main(["train", "--data", small_data, "--out", str(tmp_path / "o"), "--set", "model.hidden=3"]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'model.hidden'" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--config", "nope", "--out", str(tmp_path / "o")]) == 1
    assert "config 'nope' not found" in capsys.readouterr().err


def test_overfits_two_short_videos(tmp_path):
    """The model learns: two short synthetic videos are fitted, every track found with its identity
    at a tube IoU above 0.75 (matching, losses, correspondence learning and the inference loop all
    have to be right for that), and AP >= 0.90 (issue 3's target) on 128x213 frames."""
    root = str(tmp_path / "two")
    synth.generate(root, 2, frames=8, height=128, width=213, seed=3, max_objects=2, workers=1)
    out = str(tmp_path / "run")
    # 28x28 masks: the tiny recipe's 14x14 masks cap AP at ~0.65 on 96-pixel frames (AP50 1.0).
    # The paper's pairs and step lr: with the tiny recipe's lead clips and cosine lr (made for 36-frame
    # videos) these 8-frame videos reach AP 0.68 in 250 steps (measured 2026-11-24, not investigated).
    settings = SMALL + ["model.mask_pooler_size=14", "data.lead_clips=0", "data.correspondence_consecutive=false",
                        "train.lr_schedule=step", "train.samples_per_epoch=2", "train.batch_size=2", "train.epochs=250",
                        "train.lr=1e-3", "train.lr_drop_epochs=[200]", "train.checkpoint_every=1000",
                        "train.budget_minutes=0", "data.train_sizes=128", "data.test_size=128", "data.max_size=224",
                        "data.valid_images=train/JPEGImages", "data.valid_annotations=train/annotations.json"]
    args = ["train", "--config", "tiny", "--data", root, "--out", out, "--threads", "2"]
    for item in settings:
        args += ["--set", item]
    assert main(args) == 0
    with open(os.path.join(out, "valid.csv")) as f:
        metrics = list(csv.DictReader(f))[-1]
    # Target (issue 3): AP >= 0.90 within ~1 minute. On 96x160 frames, 250 steps gave 0.85-0.90
    # depending on float rounding alone (0.876, 0.851, 0.876, 0.9005 in sessions 7-10; 0.8505 after
    # session 11 rewrote Eq. 3's cosine similarity; 0.826 with 300 steps): the strict IoU thresholds
    # were lost on a crescent whose arms are 1-2 px wide at that size and which re-enters the frame
    # as a 1-px arc. On 128x213 frames (session 11): AP 0.950 (AP50 = AP75 = 1.0) in 1 min 36 s.
    assert float(metrics["AP50"]) >= 0.99 and float(metrics["AP75"]) >= 0.99, metrics
    assert float(metrics["AP"]) >= 0.90, metrics


def test_infer_refuses_bad_options_before_any_work(tmp_path, capsys):
    """Each is one line and exit 1 before a video is read (the data paths here do not exist)."""
    ckpt = os.path.join(os.path.dirname(__file__), "..", "models", "tiny", "tiny.pt")
    base = ["infer", "--checkpoint", ckpt, "--data", str(tmp_path / "none"), "--ann", str(tmp_path / "none.json")]
    out = ["--out", str(tmp_path / "r.json")]
    cases = [(["--device", "gpu", *out], "--device must be auto, cpu or cuda, got 'gpu'"),
             (["--threads", "-2", *out], "--threads must be >= 0"),
             (["--out", str(tmp_path)], "is a folder; give a file path"),
             ([*out, "--set", "infer.top_k=-1"], "infer.top_k must be >= 1, got -1"),
             ([*out, "--set", "infer.background_threshold=.nan"], "infer.background_threshold = nan is out of range"),
             ([*out, "--set", "infer.reset_after=0"], "infer.reset_after = 0 is out of range"),
             ([*out, "--set", "infer.num_iterations=99"], "at most the model's 3 iterations, got 99")]
    for extra, message in cases:
        assert main(base + extra) == 1, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_a_data_loader_workers_error_is_one_line():
    """torch re-raises a worker's UserError with the worker's traceback in its message: `evis
    train` prints only the message (the frame at fault), as without workers."""
    from efficientvis.errors import one_line

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise UserError("video 3 frame 5 (v3/00005.jpg): image is 160x96, not 320x192")

    with pytest.raises(UserError) as e:
        list(torch.utils.data.DataLoader(Broken(), num_workers=1))
    assert "Traceback" in str(e.value)
    assert one_line(e.value) == "video 3 frame 5 (v3/00005.jpg): image is 160x96, not 320x192"
