"""The EfficientVIS model pieces against straightforward re-statements of the paper's equations."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from efficientvis.errors import UserError
from efficientvis.training import checkpoint
from efficientvis.training.config import ModelConfig, load_config
from efficientvis.training.dynamic_conv import TemporalDynamicConv
from efficientvis.runtime.carry import carried_proposals
from efficientvis.training.infer import TorchBackend
from efficientvis.training.model import build_model
from efficientvis.training.query_attention import TrackletSelfAttention


def tiny_model_config(**changes):
    cfg = dataclasses.replace(ModelConfig(), backbone="resnet18", backbone_width=8, norm="bn",
                              freeze_at=0, hidden_dim=32, num_queries=4, num_iterations=2,
                              clip_length=4, num_classes=3, num_heads=4, ffn_dim=64, dynamic_dim=8)
    return dataclasses.replace(cfg, **changes)


def test_temporal_dynamic_conv_matches_eq3_loop():
    torch.manual_seed(0)
    B, N, T, S, C, D = 2, 3, 4, 3, 8, 4
    tdc = TemporalDynamicConv(C, D, S, "temporal").double()
    q = torch.randn(B, N, T, C, dtype=torch.float64)
    x = torch.randn(B, N, T, S * S, C, dtype=torch.float64)
    out = tdc(q, x)
    f = tdc.filter
    expected = torch.empty(B, N, T, C, dtype=torch.float64)
    for b in range(B):
        for i in range(N):
            for t in range(T):
                w1, w2 = f.filters(q[b, i, t])
                conv = {tp: f.apply(x[b, i, tp], w1, w2) for tp in (t - 1, t, t + 1) if 0 <= tp < T}
                o = torch.zeros(S * S, C, dtype=torch.float64)
                for loc in range(S * S):  # a_{i,(t,t')} per location: softmax of cosine similarities
                    sims = torch.stack([F.cosine_similarity(conv[tp][loc], conv[t][loc], dim=0)
                                        for tp in sorted(conv)])
                    a = torch.softmax(sims, 0)
                    o[loc] = sum(a[k] * conv[tp][loc] for k, tp in enumerate(sorted(conv)))
                expected[b, i, t] = F.relu(tdc.norm3(tdc.out_layer(o.flatten())))
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-9)


def test_still_dynamic_conv_ignores_neighbours():
    torch.manual_seed(0)
    tdc = TemporalDynamicConv(8, 4, 3, "still")
    q, x = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 9, 8)
    y = x.clone()
    y[:, :, 0] += 5  # change frame 0 only
    out_x, out_y = tdc(q, x), tdc(q, y)
    torch.testing.assert_close(out_x[:, :, 1:], out_y[:, :, 1:])


def test_factorised_attention_is_temporal_then_spatial():
    torch.manual_seed(0)
    attn = TrackletSelfAttention(16, 4, "factorised").eval()
    q = torch.randn(2, 3, 5, 16)
    out = attn(q)
    # temporal: each query's 5 embeddings attend to each other (Eq. 1)
    temporal = torch.stack([attn.temporal(q[b]) for b in range(2)])
    # spatial: in each frame the 3 queries attend to each other (Eq. 2)
    expected = torch.stack([torch.stack([attn.spatial(temporal[b, :, t][None])[0] for t in range(5)], 1)
                            for b in range(2)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["spatial", "temporal", "joint"])
def test_attention_ablations_keep_shape_and_mix_as_declared(scheme):
    torch.manual_seed(0)
    attn = TrackletSelfAttention(16, 4, scheme).eval()
    q = torch.randn(1, 3, 4, 16)
    q2 = q.clone()
    q2[0, 0, 0] += 3.0  # perturb query 0 at frame 0
    d = (attn(q2) - attn(q)).abs().sum(-1)[0]  # (N, T): who is affected
    other_query_same_frame = d[1, 0] > 1e-6
    same_query_other_frame = d[0, 1] > 1e-6
    other_query_other_frame = d[1, 1] > 1e-6
    assert other_query_same_frame == (scheme in ("spatial", "joint"))
    assert same_query_other_frame == (scheme in ("temporal", "joint"))
    assert other_query_other_frame == (scheme == "joint")


def test_model_outputs_every_iteration_any_clip_length():
    torch.manual_seed(0)
    cfg = tiny_model_config()
    model = build_model(cfg).eval()
    frames = torch.randint(0, 255, (1, 3, 3, 64, 96), dtype=torch.uint8)  # T'=3 < T=4
    with torch.no_grad():
        out = model(frames)
        assert len(out["stages"]) == cfg.num_iterations
        s = out["stages"][-1]
        assert s["class_logits"].shape == (1, 4, 3, 3)
        assert s["boxes"].shape == (1, 4, 3, 4)
        assert s["mask_logits"].shape == (1, 4, 3, 28, 28)
        assert out["next_queries"].shape == (1, 4, 32)
        torch.testing.assert_close(out["next_queries"], s["queries"].mean(2))
        # eval: only the last iteration's masks are computed (training mode: every iteration's)
        assert all("mask_logits" not in st for st in out["stages"][:-1])
        anytime = model(frames, num_iterations=1)
        assert len(anytime["stages"]) == 1
        torch.testing.assert_close(anytime["stages"][0]["boxes"], out["stages"][0]["boxes"])
        # the recurrence: other initial queries change the result
        other = model(frames, init_queries=out["next_queries"])
        assert not torch.allclose(other["stages"][-1]["class_logits"], s["class_logits"])
        # longer clips than trained (infer.clip_length): no weight depends on T
        longer = model(torch.randint(0, 255, (1, 8, 3, 64, 96), dtype=torch.uint8))
        assert longer["stages"][-1]["mask_logits"].shape == (1, 4, 8, 28, 28)
        assert all("mask_logits" in st for st in model.train()(frames)["stages"])  # deep supervision


def test_carried_proposals_replace_the_learned_ones_of_active_slots_only():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(carry_proposals=True, carry_threshold=0.2)).eval()
    frames = torch.randint(0, 255, (1, 4, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        out = model(frames)
        last = out["stages"][-1]
        active, boxes = out["carried"]
        # what the next clip gets: slots with any class probability >= 0.2, their last-frame box
        assert torch.equal(active, last["class_logits"].sigmoid().amax((2, 3)) >= 0.2)
        torch.testing.assert_close(boxes, last["boxes"][:, :, -1])
        learned = model.initial_proposals(torch.tensor([[64.0, 96.0]]), 4)[:, :, 0]
        inactive = model(frames, carried=(torch.zeros(1, 4, dtype=torch.bool), boxes))
        carried_learned = model(frames, carried=(torch.ones(1, 4, dtype=torch.bool), learned))
        torch.testing.assert_close(inactive["stages"][-1]["boxes"], last["boxes"])
        torch.testing.assert_close(carried_learned["stages"][-1]["boxes"], last["boxes"])
        box = torch.tensor([10.0, 12.0, 40.0, 44.0]).expand(1, 4, 4)
        moved = model(frames, carried=(torch.tensor([[True, False, False, False]]), box))
    # the active slot's first iteration pools its carried box (the others see it in self-attention)
    assert not torch.allclose(moved["stages"][0]["boxes"][0, 0], out["stages"][0]["boxes"][0, 0])
    # carried boxes are clipped to the image; one with no pixel inside starts from the learned box
    size = torch.tensor([[64.0, 96.0]])
    off = torch.tensor([[[-30.0, 10.0, 50.0, 80.0], [100.0, 5.0, 140.0, 30.0], [5.0, -9.0, 20.0, 0.5],
                         [1.0, 2.0, 3.0, 4.0]]])
    start = model.initial_proposals(size, 2, (torch.tensor([[True, True, True, False]]), off))
    torch.testing.assert_close(start[0, :, 1], torch.stack([torch.tensor([0.0, 10.0, 50.0, 64.0]),
                                                            learned[0, 1], learned[0, 2], learned[0, 3]]))
    # the runtime's clip loop applies the same rule to a backend's numpy outputs (a reset slot
    # does not carry: it starts from q* and the learned box)
    probs = last["class_logits"][0].sigmoid().numpy()
    got_active, got_boxes = carried_proposals(probs, last["boxes"][0].numpy(), 0.2, np.zeros(4, bool))
    np.testing.assert_array_equal(got_active, active[0].numpy())
    np.testing.assert_array_equal(got_boxes, boxes[0].numpy())
    reset = np.array([True, False, True, False])
    assert not carried_proposals(probs, last["boxes"][0].numpy(), 0.0, reset)[0][reset].any()
    # evis infer's backend takes them as the graphs do: (active (N,) bool, boxes (N, 4)) numpy
    backend = TorchBackend(model, "cpu")
    backend.start_video()
    got = backend.run_clip(frames[0].numpy(), np.zeros(4, bool), None, (np.array([True, False, False, False]),
                                                                         box[0].numpy()))
    torch.testing.assert_close(torch.from_numpy(got["boxes"]), moved["stages"][-1]["boxes"][0])


def test_inference_clip_length_defaults_to_the_trained_T():
    from efficientvis.training.config import Config
    from efficientvis.training.infer import loop_options
    cfg = Config()
    cfg.model.clip_length = 6
    assert loop_options(cfg).clip_length == 6
    cfg.infer.clip_length = 12
    assert loop_options(cfg).clip_length == 12
    cfg.infer.clip_length = -1
    with pytest.raises(UserError, match="infer.clip_length must be >= 1"):
        loop_options(cfg)


def test_initial_queries_repeat_one_embedding_and_proposals_cover_the_image():
    cfg = tiny_model_config()
    model = build_model(cfg)
    q = model.initial_queries(2, 4)
    assert torch.equal(q[:, :, 0], q[:, :, 3])
    boxes = model.initial_proposals(torch.tensor([[64.0, 96.0]]), 4)
    torch.testing.assert_close(boxes[0, 0, 0], torch.tensor([0.0, 0.0, 96.0, 64.0]))


def test_time_shared_queries_have_one_embedding():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(time_shared_queries=True)).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 255, (1, 4, 3, 64, 96), dtype=torch.uint8))
    q = out["stages"][-1]["queries"]
    torch.testing.assert_close(q[:, :, 0], q[:, :, 3])


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    cfg = load_config("tiny")
    model = build_model(cfg.model)
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save(path, model=model.state_dict(), config=cfg.to_dict(), class_names=["a"])
    ckpt = checkpoint.load(path)  # weights_only=True inside
    other = build_model(checkpoint.config_of(ckpt, path).model)
    checkpoint.load_model_state(other, ckpt["model"], path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    wrong = load_config("tiny", ["model.hidden_dim=32"])
    with pytest.raises(UserError, match="hidden_dim"):
        checkpoint.check_model_config(checkpoint.config_of(ckpt, path).model, wrong.model, path)
    with pytest.raises(UserError, match="does not fit"):
        checkpoint.load_model_state(build_model(wrong.model), ckpt["model"], path)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be loaded"):
        checkpoint.load(str(tmp_path / "bad.pt"))


def test_initial_box_layouts():
    from efficientvis.training.model import initial_box_layout

    whole = initial_box_layout(4, "image")
    assert torch.equal(whole, torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 4))
    for n in (1, 6, 10):
        grid = initial_box_layout(n, "grid")  # (n, 4) cx, cy, w, h
        assert grid.shape == (n, 4) and len({tuple(b[:2].tolist()) for b in grid}) == n  # distinct cells
        assert (grid[:, :2] > 0).all() and (grid[:, :2] < 1).all() and (grid[:, 2:] <= 1).all()
    # the 6-query grid: 2 rows x 3 columns, every point of the image inside some box
    grid = initial_box_layout(6, "grid")
    xs, ys = torch.meshgrid(torch.linspace(0, 1, 21), torch.linspace(0, 1, 21), indexing="xy")
    pts = torch.stack([xs.flatten(), ys.flatten()], 1)
    lo, hi = grid[:, :2] - grid[:, 2:] / 2, grid[:, :2] + grid[:, 2:] / 2
    inside = ((pts[:, None] >= lo[None] - 1e-6) & (pts[:, None] <= hi[None] + 1e-6)).all(-1).any(1)
    assert inside.all()
    with pytest.raises(ValueError, match="init_boxes"):
        initial_box_layout(3, "random")
