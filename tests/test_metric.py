"""The YouTube-VIS metric: hand-computed cases, an independent pycocotools reference, random
problems (hypothesis), results validation and `evis eval`."""

import contextlib
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from efficientvis.cli import main
from efficientvis.errors import UserError
from efficientvis.ytvis import format as fmt
from efficientvis.ytvis import metric
from efficientvis.ytvis.metric import METRIC_NAMES, evaluate, validate_results

# pycocotools' decode on numpy 2 warns about `copy=False`; harmless here
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# ----------------------------------------------------------------------------- builders


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def rle(mask):
    return mask if mask is None or isinstance(mask, dict) else fmt.encode(mask)


def gt_dict(videos, annotations, categories=(1,)):
    """videos: [(id, length, height, width)]."""
    return {
        "videos": [{"id": vid, "length": n, "height": h, "width": w,
                    "file_names": [f"v{vid}/{t:05d}.jpg" for t in range(n)]}
                   for vid, n, h, w in videos],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}", "supercategory": "thing"} for c in categories],
    }


def track(ann_id, video_id, frames, category_id=1, iscrowd=0, areas=None):
    """A ground-truth track; `areas` defaults to the mask areas (null where absent) as in the data."""
    if areas is None:
        areas = [None if f is None else float(f.sum()) for f in frames]
    return {"id": ann_id, "video_id": video_id, "category_id": category_id, "iscrowd": iscrowd,
            "segmentations": [rle(f) for f in frames], "areas": areas}


def det(video_id, frames, score, category_id=1):
    return {"video_id": video_id, "category_id": category_id, "score": score,
            "segmentations": [rle(f) for f in frames]}


def run_metric(gt, results):
    return evaluate(fmt.parse(json.loads(json.dumps(gt))), json.loads(json.dumps(results)))


# ----------------------------------------------------------------------------- reference


class _TallImageEval(COCOeval):
    """COCOeval with regular IoU for crowd ground truth too (YouTube-VIS uses regular video IoU for
    every pair; crowd ground truth stays ignored and multi-matchable via `iscrowd`)."""

    def computeIoU(self, imgId, catId):
        gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        if len(gt) == 0 and len(dt) == 0:
            return []
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in order][:self.params.maxDets[-1]]
        return mask_utils.iou([d["segmentation"] for d in dt], [g["segmentation"] for g in gt],
                              [0] * len(gt))


def _tall(segs, h, w):
    """A track's frames stacked vertically into one (T*H, W) image: its RLE's intersection/union
    with another stacked track are the sums over frames, i.e. the video IoU."""
    frames = [np.zeros((h, w), np.uint8) if not s else
              mask_utils.decode(mask_utils.frPyObjects(s, h, w) if isinstance(s["counts"], list)
                                else {"size": s["size"], "counts": s["counts"].encode()})
              for s in segs]
    return mask_utils.encode(np.asfortranarray(np.concatenate(frames, axis=0)))


def _official_mean(values):
    kept = [a for a in values if a]
    return float(np.array(kept).mean()) if kept else 0.0


def coco_reference(gt, results):
    """The 12 numbers from pycocotools' COCOeval on the stacked-frames problem."""
    videos = {v["id"]: v for v in gt["videos"]}
    images = [{"id": v["id"], "height": v["height"] * len(v["file_names"]), "width": v["width"]}
              for v in gt["videos"]]
    cats = [dict(c) for c in gt["categories"]]
    anns = []
    for a in gt["annotations"]:
        v = videos[a["video_id"]]
        seg = _tall(a["segmentations"], v["height"], v["width"])
        mask_areas = [float(mask_utils.area(mask_utils.frPyObjects(s, v["height"], v["width"])
                                            if isinstance(s["counts"], list) else
                                            {"size": s["size"], "counts": s["counts"].encode()}))
                      if s else None for s in a["segmentations"]]
        areas = a["areas"] if isinstance(a.get("areas"), list) else mask_areas
        anns.append({"id": a["id"], "image_id": a["video_id"], "category_id": a["category_id"],
                     "iscrowd": a.get("iscrowd", 0), "segmentation": seg,
                     "area": _official_mean(areas), "bbox": list(mask_utils.toBbox(seg))})
    dets = []
    for i, r in enumerate(results):
        v = videos[r["video_id"]]
        seg = _tall(r["segmentations"], v["height"], v["width"])
        areas = [float(mask_utils.area({"size": s["size"], "counts": s["counts"].encode()}))
                 if s else None for s in r["segmentations"]]
        dets.append({"id": i + 1, "image_id": r["video_id"], "category_id": r["category_id"],
                     "score": r["score"], "segmentation": seg, "area": _official_mean(areas),
                     "iscrowd": 0, "bbox": list(mask_utils.toBbox(seg))})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "annotations": anns, "categories": cats}
        coco_gt.createIndex()
        coco_dt.dataset = {"images": images, "annotations": dets, "categories": cats}
        coco_dt.createIndex()
        e = _TallImageEval(coco_gt, coco_dt, "segm")
        e.params.areaRng = [[0, 1e10], [0, 128 ** 2], [128 ** 2, 256 ** 2], [256 ** 2, 1e10]]
        e.evaluate()
        e.accumulate()
        e.summarize()
    return dict(zip(METRIC_NAMES, (float(s) for s in e.stats)))


def assert_same(ours, ref):
    assert list(ours) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert ours[name] == pytest.approx(ref[name], abs=1e-9, rel=0), (name, ours, ref)


def check(gt, results, expected=None):
    """Ours vs the pycocotools reference, and vs hand-computed values where given."""
    ours = run_metric(gt, results)
    assert_same(ours, coco_reference(gt, results))
    for name, value in (expected or {}).items():
        assert ours[name] == pytest.approx(value, abs=1e-12, rel=0), (name, ours[name], value)
    return ours


# ----------------------------------------------------------------------------- hand-computed

H, W = 4, 5


def test_perfect_detection():
    a = box(H, W, 0, 2, 0, 2)
    gt = gt_dict([(1, 2, H, W)], [track(1, 1, [a, a])])
    # one gt, one identical det: AP = AR = 1 everywhere the gt counts (mean area 4: small only)
    check(gt, [det(1, [a, a], 0.9)], {"AP": 1, "AP50": 1, "AP75": 1, "APs": 1, "APm": -1,
                                       "APl": -1, "AR1": 1, "AR10": 1, "AR100": 1, "ARs": 1,
                                       "ARm": -1, "ARl": -1})


def test_a_track_of_more_than_255_frames():
    """Long videos: pycocotools' area() of 256+ RLEs in one call overflows; the metric chunks it."""
    a, b = box(H, W, 0, 2, 0, 2), box(H, W, 1, 3, 1, 4)
    frames = [a if t % 3 else b for t in range(300)]
    gt = gt_dict([(1, 300, H, W)], [track(1, 1, frames)])
    half = frames[:150] + [None] * 150  # video IoU 0.5: found at AP50 only
    check(gt, [det(1, frames, 0.9), det(1, half, 0.8)], {"AP": 1, "AP50": 1, "AR1": 1})


def test_iou_exactly_on_threshold():
    g = box(H, W, 0, 2, 0, 2)  # 4 px
    d = box(H, W, 0, 2, 0, 2)
    d[1, 1] = False  # 3 px inside: IoU = 3/4 = 0.75 exactly
    gt = gt_dict([(1, 1, H, W)], [track(1, 1, [g])])
    # matched at thresholds .50 .55 .60 .65 .70 .75 (IoU >= t), not at .80-.95: AP = 6/10
    check(gt, [det(1, [d], 0.5)], {"AP": 0.6, "AP50": 1, "AP75": 1, "AR100": 0.6, "AR1": 0.6})


def test_video_iou_sums_over_frames():
    a4 = box(H, W, 0, 2, 0, 2)
    a2 = box(H, W, 0, 1, 0, 2)  # 2 px inside a4
    b3 = box(H, W, 3, 4, 0, 3)  # 3 px elsewhere
    gt = gt_dict([(1, 4, H, W)], [track(1, 1, [a4, a4, None, a4])])
    # det [a2, a4, b3, -]: I = 2 + 4 = 6, U = 4 + 4 + 3 + 4 = 15 -> 0.4: no match at all
    check(gt, [det(1, [a2, a4, b3, None], 0.9)], {"AP": 0, "AP50": 0, "AR100": 0})
    # det [a2, a4, -, -]: I = 6, U = 4 + 4 + 0 + 4 = 12 -> 0.5: matched at .50 only
    check(gt, [det(1, [a2, a4, None, None], 0.9)], {"AP": 0.1, "AP50": 1, "AP75": 0,
                                                    "AR100": 0.1})


def test_interpolated_precision_and_max_dets():
    a, b, c = box(H, W, 0, 1, 0, 1), box(H, W, 2, 3, 2, 3), box(H, W, 3, 4, 4, 5)
    gt = gt_dict([(1, 1, H, W)], [track(1, 1, [a]), track(2, 1, [b])])
    # ranked: TP (.9), FP (.8), TP (.7); recall .5, .5, 1; precision 1, .5, 2/3 -> envelope
    # 1, 2/3, 2/3: recall thresholds 0.00..0.50 (51) give 1, 0.51..1.00 (50) give 2/3.
    ap = (51 * 1 + 50 * 2 / 3) / 101
    # AR1: one detection per video and category -> recall .5
    check(gt, [det(1, [a], 0.9), det(1, [c], 0.8), det(1, [b], 0.7)],
          {"AP": ap, "AP50": ap, "AP75": ap, "AR1": 0.5, "AR10": 1, "AR100": 1})


def test_recall_threshold_float_values():
    # 10 gts, 7 found: recall 0.7, but RECALL_THRESHOLDS[70] is 0.7000000000000001 > 0.7, so only
    # thresholds 0.00..0.69 (70 of 101) reach precision 1: AP = 70/101 (not 71/101).
    frames = [box(2, 5, y, y + 1, x, x + 1) for y in range(2) for x in range(5)]
    gt = gt_dict([(1, 1, 2, 5)], [track(i + 1, 1, [f]) for i, f in enumerate(frames)])
    results = [det(1, [frames[i]], 1.0 - i / 100) for i in range(7)]
    check(gt, results, {"AP": 70 / 101, "AP50": 70 / 101, "AR100": 0.7, "AR1": 0.1})


@pytest.mark.parametrize("fp_video, ap", [(1, 0.5), (2, 1.0)])
def test_tied_scores_across_videos_follow_video_id_order(fp_video, ap):
    a = box(H, W, 0, 2, 0, 2)
    tp_video = 3 - fp_video
    # videos listed out of id order in the file: the official code walks them in id order
    gt = gt_dict([(2, 1, H, W), (1, 1, H, W)], [track(1, tp_video, [a])])
    # equal scores: the stable sort keeps video-id order. FP first: precision 0, .5 -> envelope .5
    # everywhere -> AP .5. TP first: recall reaches 1 at the first detection -> AP 1.
    check(gt, [det(tp_video, [a], 0.5), det(fp_video, [a], 0.5)], {"AP": ap, "AR100": 1})


@pytest.mark.parametrize("tp_first, ap", [(False, 0.5), (True, 1.0)])
def test_tied_scores_in_a_video_follow_file_order(tp_first, ap):
    a, b = box(H, W, 0, 2, 0, 2), box(H, W, 3, 4, 3, 5)
    gt = gt_dict([(1, 1, H, W)], [track(1, 1, [a])])
    results = [det(1, [b], 0.5), det(1, [a], 0.5)]
    check(gt, results[::-1] if tp_first else results, {"AP": ap})


def test_crowd_regular_iou_multi_match_and_categories_without_gt():
    h, w = 4, 6
    normal = box(h, w, 3, 4, 0, 2)
    crowd = box(h, w, 0, 2, 0, 4)  # 8 px
    d2, d3 = box(h, w, 0, 2, 0, 2), box(h, w, 0, 2, 2, 4)  # 4 px each inside the crowd
    gt = gt_dict([(1, 1, h, w)], [track(1, 1, [normal]), track(2, 1, [crowd], iscrowd=1),
                                  track(3, 1, [crowd], category_id=2, iscrowd=1)],
                 categories=(1, 2, 3))
    results = [det(1, [d3], 0.97), det(1, [d2], 0.95), det(1, [normal], 0.9),
               det(1, [d2], 0.9, category_id=2), det(1, [normal], 0.9, category_id=3)]
    # category 1: d3, d2 have regular IoU 4/8 = .5 with the crowd gt (intersection over the
    # detection would be 1). At t = .50 both are matched to the crowd gt (multi-matchable) and
    # ignored: AP_.50 = 1. At t > .50 they are FPs ranked before the TP: precision 0, 0, 1/3 ->
    # AP_t = 1/3. AP = (1 + 9 / 3) / 10 = .4. Categories 2 (crowd gt only) and 3 (no gt) are -1
    # and left out of the means.
    check(gt, results, {"AP": 0.4, "AP50": 1, "AP75": 1 / 3, "AR100": 1})


def test_area_ranges_boundary_and_ignored_detections():
    n = 300
    g = box(n, n, 0, 128, 0, 128)  # 128² = 16384: small AND medium (both ends inclusive)
    big = box(n, n, 100, 300, 100, 300)  # 40000: medium
    gt = gt_dict([(1, 1, n, n)], [track(1, 1, [g])])
    # FP (big, .95) then TP (.9). small: the unmatched FP is outside the range -> ignored -> 1.
    # medium and all: FP counts -> precision 0, .5 -> .5. large: the gt is outside -> -1.
    check(gt, [det(1, [big], 0.95), det(1, [g], 0.9)],
          {"AP": 0.5, "APs": 1, "APm": 0.5, "APl": -1, "ARs": 1, "ARm": 1, "ARl": -1})


def test_gt_area_range_uses_the_file_areas():
    a = box(H, W, 0, 2, 0, 2)  # 4 px masks, but the file says otherwise
    gt = gt_dict([(1, 4, H, W)], [track(1, 1, [a, a, None, a], areas=[20000, None, 0, 30000])])
    # mean of the truthy file areas = 25000 -> medium; the identical detection (mean area 4, small)
    # is matched, so it counts in medium: APm = 1, APs = -1 (no gt in range).
    check(gt, [det(1, [a, a, None, a], 0.9)], {"AP": 1, "APs": -1, "APm": 1, "APl": -1})


def test_never_present_gt_and_zero_union():
    a = box(H, W, 0, 2, 0, 2)
    gt = gt_dict([(1, 2, H, W)], [track(1, 1, [a, a]), track(2, 1, [None, None])])
    # the never-present gt (mean area 0: small) cannot be matched (IoU 0, union 0 with an absent
    # detection): recall .5, precision 1 up to recall .5 -> AP = 51/101
    check(gt, [det(1, [a, a], 0.9), det(1, [None, None], 0.8)],
          {"AP": 51 / 101, "AR100": 0.5})


def test_only_100_detections_per_video_and_category():
    a, b = box(H, W, 0, 2, 0, 2), box(H, W, 3, 4, 3, 5)
    gt = gt_dict([(1, 1, H, W)], [track(1, 1, [a])])
    results = [det(1, [b], 1.0 - i / 1000) for i in range(100)] + [det(1, [a], 0.5)]
    # the only TP is the 101st detection by score: dropped
    check(gt, results, {"AP": 0, "AR100": 0})


def test_gt_id_zero_is_unmatched_like_the_official_code():
    a = box(H, W, 0, 2, 0, 2)
    gt = gt_dict([(1, 1, H, W)], [track(0, 1, [a])])
    # a match is recorded by gt id, and id 0 reads as "no match": the detection is a FP
    check(gt, [det(1, [a], 0.9)], {"AP": 0, "AR100": 0})


def test_no_results_and_empty_ground_truth():
    a = box(H, W, 0, 2, 0, 2)
    gt = gt_dict([(1, 1, H, W)], [track(1, 1, [a])], categories=(1, 2))
    assert run_metric(gt, []) == {**{n: 0.0 for n in METRIC_NAMES},
                                  "APm": -1, "APl": -1, "ARm": -1, "ARl": -1}
    empty = gt_dict([(1, 1, H, W)], [])
    assert run_metric(empty, [det(1, [a], 0.9)]) == {n: -1.0 for n in METRIC_NAMES}


def test_exact_intersections_on_large_frames():
    # thin, barely-overlapping masks on a 720x1280 frame: recovered intersections must be exact
    rng = np.random.default_rng(0)
    h, w = 720, 1280
    masks = []
    for _ in range(6):
        m = np.zeros((h, w), bool)
        y, x = rng.integers(0, h - 300), rng.integers(0, w - 300)
        m[y:y + rng.integers(1, 300), x:x + rng.integers(1, 300)] = True
        m[rng.random((h, w)) < 0.01] = True
        masks.append(m)
    d_rles = [fmt._as_bytes(fmt.encode(m)) for m in masks[:3]]
    g_rles = [fmt._as_bytes(fmt.encode(m)) for m in masks[3:]]
    inter = metric._frame_intersections(d_rles, g_rles, np.array([m.sum() for m in masks[:3]], float),
                                        np.array([m.sum() for m in masks[3:]], float))
    expected = np.array([[np.logical_and(a, b).sum() for b in masks[3:]] for a in masks[:3]])
    assert np.array_equal(inter, expected)


# ----------------------------------------------------------------------------- random problems

GRIDS = [(2, 2), (2, 3), (3, 4)]
SCALES = [1, 2, 50, 150]  # masks on a coarse grid upscaled: areas from 1 px to > 256²


@st.composite
def problems(draw):
    n_cats = draw(st.integers(1, 3))
    gh, gw = draw(st.sampled_from(GRIDS))
    scale = draw(st.sampled_from(SCALES))
    h, w = gh * scale, gw * scale
    cell = st.lists(st.booleans(), min_size=gh * gw, max_size=gh * gw)

    def frame(bits):
        return None if bits is None else np.kron(np.array(bits, bool).reshape(gh, gw),
                                                 np.ones((scale, scale), bool))

    videos, anns, results = [], [], []
    next_id = draw(st.sampled_from([0, 1, 1, 1]))  # gt id 0 now and then (official quirk)
    for vid in draw(st.lists(st.integers(1, 9), min_size=1, max_size=3, unique=True)):
        length = draw(st.integers(1, 5))
        videos.append((vid, length, h, w))
        gts = []
        for _ in range(draw(st.integers(0, 4))):
            bits = [draw(st.one_of(st.none(), cell)) for _ in range(length)]
            frames = [frame(b) for b in bits]
            mode = draw(st.sampled_from(["mask", "mask", "mask", "none", "odd"]))
            a = track(next_id, vid, frames, category_id=draw(st.integers(1, n_cats)),
                      iscrowd=draw(st.sampled_from([0, 0, 0, 0, 1])))
            if mode == "none":
                del a["areas"]
            elif mode == "odd":
                a["areas"] = draw(st.lists(st.sampled_from([None, 0, 3, 2500.5, 20000, 70000]),
                                           min_size=length, max_size=length))
            anns.append(a)
            gts.append(bits)
            next_id += 1
        for _ in range(draw(st.integers(0, 6))):
            if gts and draw(st.booleans()):  # a perturbed copy of a gt: high IoUs, ties
                base = draw(st.sampled_from(gts))
                bits = []
                for b in base:
                    if b is not None and draw(st.booleans()):
                        b = list(b)
                        for i in draw(st.lists(st.integers(0, gh * gw - 1), max_size=2)):
                            b[i] = not b[i]
                    bits.append(None if draw(st.integers(0, 9)) == 0 else b)
            else:
                bits = [draw(st.one_of(st.none(), cell)) for _ in range(length)]
            r = det(vid, [frame(b) for b in bits], draw(st.sampled_from([0.1, 0.5, 0.5, 0.9, 1])),
                    category_id=draw(st.integers(1, n_cats)))
            if draw(st.integers(0, 4)) == 0:  # absent frames written as {} or [] sometimes
                r["segmentations"] = [s if s is not None else draw(st.sampled_from([None, {}, []]))
                                      for s in r["segmentations"]]
            results.append(r)
    return gt_dict(videos, anns, categories=range(1, n_cats + 1)), results


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_problems_match_pycocotools_reference(problem):
    gt, results = problem
    assert_same(run_metric(gt, results), coco_reference(gt, results))


# ----------------------------------------------------------------------------- validation

def _small_problem():
    a = box(H, W, 0, 2, 0, 2)
    return gt_dict([(1, 2, H, W), (2, 3, H, W)], [track(1, 1, [a, a])], categories=(1, 2)), a


@pytest.mark.parametrize("bad, words", [
    (lambda a: det(7, [a, a], 0.5), ["entry 1", "unknown video_id 7"]),
    (lambda a: det(1, [a], 0.5), ["entry 1", "video 1", "1 segmentations for the 2 frames"]),
    (lambda a: det(1, [a, fmt.encode(np.zeros((5, 5), bool))], 0.5),
     ["entry 1", "frame 1", "RLE size [5, 5] differs from the video size [4, 5]"]),
    (lambda a: det(1, [a, a], 0.5, category_id=9), ["entry 1", "unknown category_id 9"]),
    (lambda a: {"video_id": 1, "category_id": 1, "segmentations": [None, None]},
     ["entry 1", "missing field(s) score"]),
    (lambda a: det(1, [a, a], "high"), ["entry 1", "score 'high' is not a number"]),
    (lambda a: det(1, [a, a], float("nan")), ["entry 1", "not a number"]),
    (lambda a: {**det(1, [a, a], 0.5), "segmentations": [[[0, 0, 1, 0, 1, 1]], None]},
     ["entry 1", "frame 0", "compressed RLE"]),
    (lambda a: "nope", ["entry 1", "not an object"]),
    # RLE counts pycocotools would trust: a wrong metric, or an iou/merge that never returns
    (lambda a: {**det(1, [a, a], 0.5), "segmentations": [{"size": [H, W], "counts": "!!!garbage~~~"}, None]},
     ["entry 1", "frame 0", "invalid RLE", "outside COCO's RLE alphabet"]),
    (lambda a: {**det(1, [a, a], 0.5), "segmentations": [None, {"size": [H, W], "counts": "héllo"}]},
     ["entry 1", "frame 1", "invalid RLE"]),
    (lambda a: {**det(1, [a, a], 0.5), "segmentations": [{"size": [H, W], "counts": [H * W - 1]}, None]},
     ["entry 1", "frame 0", f"runs cover {H * W - 1} pixels, not {H}x{W}"]),
    (lambda a: {**det(1, [a, a], 0.5), "segmentations": [{"size": [H, W], "counts": [-5, H * W + 5]}, None]},
     ["entry 1", "frame 0", "negative or longer than the frame"]),
    (lambda a: {**det(1, [a, a], 0.5), "segmentations": [{"size": [H, W], "counts": [2 ** 70, 5]}, None]},
     ["entry 1", "frame 0", "negative or longer than the frame"]),
    (lambda a: {**det(1, [a, a], 0.5), "segmentations": [{"size": [H, W], "counts": ""}, None]},
     ["entry 1", "frame 0", "runs cover 0 pixels"]),
])
def test_validation_names_the_offending_entry(bad, words):
    gt, a = _small_problem()
    results = json.loads(json.dumps([det(1, [a, a], 0.9), bad(a)]))
    with pytest.raises(UserError) as e:
        validate_results(fmt.parse(gt), results, "res.json")
    message = str(e.value)
    assert "\n" not in message and message.startswith("res.json: 1 invalid result entry of 2")
    for word in words:
        assert word in message


def test_validation_lists_ten_and_counts_the_rest():
    gt, a = _small_problem()
    results = [det(3, [a], 0.5) for _ in range(25)]
    with pytest.raises(UserError) as e:
        evaluate(fmt.parse(gt), json.loads(json.dumps(results)))
    message = str(e.value)
    assert "25 invalid result entries of 25" in message and "and 15 more" in message
    assert "entry 9 " in message and "entry 10 " not in message


def test_validation_rejects_non_list():
    gt, _ = _small_problem()
    with pytest.raises(UserError, match="expected a JSON list"):
        validate_results(fmt.parse(gt), {"results": []})


def test_rle_check_accepts_every_pycocotools_encoding_and_rejects_a_wrong_size():
    """fmt.rle_problem decodes COCO's compressed counts itself: every mask pycocotools encodes
    (random, empty, full, one corner block; compressed, as str and as uncompressed runs) passes,
    the same counts for a frame one pixel wider do not, and neither do bad ground-truth RLEs."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = (int(x) for x in rng.integers(1, 40, 2))
        m = rng.random((h, w)) < rng.random()
        if trial % 4 == 1:
            m = np.zeros((h, w), bool)
        if trial % 4 == 2:
            m = np.ones((h, w), bool)
        if trial % 4 == 3:
            m = box(h, w, int(rng.integers(0, h)), h, int(rng.integers(0, w)), w)
        counts = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"]
        flat = m.ravel(order="F").astype(np.int8)
        changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
        runs = np.diff(np.concatenate([[0], changes])).tolist()
        runs = runs if flat[0] == 0 else [0] + runs
        for form in (counts, counts.decode(), runs):
            assert fmt.rle_problem(form, h, w) is None, (trial, form)
        assert "runs cover" in fmt.rle_problem(counts, h, w + 1)
    # the runs of "T3T3b1lL0" (15x20) with its -100 sign-padded to 7 characters: the sum is right
    # in 64 bits, but pycocotools decodes 32-bit ints and would see other runs (and hang in iou)
    assert fmt.rle_problem("T3T3b1lL0", 15, 20) is None
    assert "longer than 6 characters" in fmt.rle_problem("T3T3b1llooooO0", 15, 20)
    gt = gt_dict([(1, 1, H, W)], [track(1, 1, [box(H, W, 0, 2, 0, 2)])])
    gt["annotations"][0]["segmentations"] = [{"size": [H, W], "counts": [H * W - 1]}]
    with pytest.raises(UserError, match=r"frame 0 \(v1/00000.jpg\) annotation 1: invalid RLE \(its runs cover 19 pixels"):
        fmt.parse(gt)


def test_uncompressed_rle_results_are_accepted():
    gt, a = _small_problem()
    flat = a.ravel(order="F").astype(int)  # uncompressed RLE: run lengths, column-major, 0s first
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    result = {"video_id": 1, "category_id": 1, "score": 1.0,
              "segmentations": [{"size": [H, W], "counts": runs}, None]}
    full = {"video_id": 1, "category_id": 1, "score": 1.0, "segmentations": [rle(a), None]}
    assert run_metric(gt, [result]) == run_metric(gt, [full])


# ----------------------------------------------------------------------------- command line

def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    a, b = box(H, W, 0, 2, 0, 2), box(H, W, 3, 4, 3, 5)
    gt = gt_dict([(1, 1, H, W)], [track(1, 1, [a]), track(2, 1, [b])])
    results = [det(1, [a], 0.9), det(1, [b], 0.2)]
    gt_path, res_path = _write(tmp_path / "gt.json", gt), _write(tmp_path / "res.json", results)
    out = tmp_path / "sub" / "metrics.json"
    assert main(["eval", "--gt", gt_path, "--results", res_path, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "AP     Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.0000" in text
    assert "ARl" in text and "-1.0000" in text
    metrics = json.loads(out.read_text())
    assert list(metrics) == list(METRIC_NAMES) and metrics["AP"] == 1.0 and metrics["APl"] == -1
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temp file left
    # a folder where the JSON should go: one line before anything is computed
    capsys.readouterr()
    assert main(["eval", "--gt", gt_path, "--results", res_path, "--json", str(tmp_path)]) == 1
    err = capsys.readouterr()
    assert f"--json {tmp_path} is a folder; give a file path" in err.err and "Average" not in err.out


def test_cli_scores_a_partial_results_file_on_its_finished_videos(tmp_path, capsys):
    """A stopped run leaves OUT.partial (one line per finished video): `evis eval` scores it on
    those videos only, as if the ground truth held only them."""
    from efficientvis.ytvis.results import ResultsWriter

    a, b = box(H, W, 0, 2, 0, 2), box(H, W, 3, 4, 3, 5)
    gt = gt_dict([(1, 1, H, W), (2, 1, H, W)], [track(1, 1, [a]), track(2, 2, [b])])
    gt_path = _write(tmp_path / "gt.json", gt)
    writer = ResultsWriter(str(tmp_path / "r.json"))
    writer.add(1, [det(1, [a], 0.9)])  # video 2 never finished
    partial = writer.partial_path
    assert main(["eval", "--gt", gt_path, "--results", partial]) == 0
    out = capsys.readouterr().out
    assert "the metric covers its 1 finished video(s) of the 2" in out
    assert "maxDets=100 ] = 1.0000" in out  # video 1 alone is perfect (with video 2 it would not be)
    full = run_metric(gt, [det(1, [a], 0.9)])
    assert full["AP"] < 1.0
    empty = tmp_path / "e.json.partial"
    empty.write_text("")
    assert main(["eval", "--gt", gt_path, "--results", str(empty)]) == 1
    assert "no finished video yet" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["bad_entry", "missing", "not_json"])
def test_cli_errors_are_one_line(tmp_path, capsys, case):
    a = box(H, W, 0, 2, 0, 2)
    gt_path = _write(tmp_path / "gt.json", gt_dict([(1, 1, H, W)], [track(1, 1, [a])]))
    res = tmp_path / "res.json"
    if case == "bad_entry":
        res.write_text(json.dumps([det(1, [a, a], 0.9)]))
    elif case == "not_json":
        res.write_text("[{")
    out = tmp_path / "m.json"
    assert main(["eval", "--gt", gt_path, "--results", str(res), "--json", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("evis eval: error: ") and err.count("\n") == 1
    assert str(res) in err
    assert not out.exists()


# ----------------------------------------------------------------------------- identity (IDF1)


def test_identity_metrics_count_idf1_and_split_the_switches():
    """12 frames in clips of 4, objects 1 and 2. Tracks 10 and 20 hold them until the clip that
    starts at frame 8, where they hand over (object 1 -> track 20, object 2 -> track 30: two
    switches at a clip start); in frame 2 a duplicate, track 11, covers object 1 better than track
    10 does (two switches inside a clip: to 11 and back). Hand-computed IDF1: one global assignment
    1 -> 10 (8 frames), 2 -> 20 (8 frames): IDTP 16 of 24 object-frames and 25 predicted masks."""
    from efficientvis.ytvis.identity import identity_metrics

    def rle(y0, y1, x0, x1):
        return mask_utils.encode(np.asfortranarray(box(40, 60, y0, y1, x0, x1).astype(np.uint8)))

    a, a_shifted, b = rle(5, 15, 5, 20), rle(5, 15, 7, 22), rle(20, 35, 30, 50)  # shifted: IoU 0.76
    gt = [{1: a, 2: b} for _ in range(12)]
    pred = []
    for t in range(12):
        if t < 8:
            frame = [(10, a_shifted if t == 2 else a), (20, b)] + ([(11, a)] if t == 2 else [])
        else:
            frame = [(20, a), (30, b)]
        pred.append(frame)
    m = identity_metrics(gt, pred, clip_length=4)
    assert m["id_switches"] == {"total": 4, "at_clip_start": 2, "within_clip": 2}
    assert m["idf1"] == round(2 * 16 / (24 + 25), 4) and m["idp"] == 0.64 and m["idr"] == round(16 / 24, 4)
    assert m["objects"] == {1: {"frames": 12, "idtp": 8, "track": 10}, 2: {"frames": 12, "idtp": 8, "track": 20}}
    # nothing predicted: no identity, no switches; a frame without objects counts predictions only
    empty = identity_metrics(gt, [[] for _ in gt], clip_length=4)
    assert (empty["idf1"], empty["id_switches"]["total"]) == (0.0, 0)
    assert identity_metrics([{}], [[(10, a)]])["idp"] == 0.0
