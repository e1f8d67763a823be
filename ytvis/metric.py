"""YouTube-VIS metric: the 12 numbers of the official evaluation (`ytvos` + `ytvoseval` of the
YouTube-VIS cocoapi fork), reproduced exactly and fast. `evis eval` runs it on a results file.

Semantics (the official ones):
- Video IoU of a detection track and a ground-truth track: sum over frames of the intersections /
  sum over frames of the unions (a missing frame adds its partner's area to the union), 0 when the
  union is 0. Intersections and unions are exact integers: each frame's D x G intersections come
  from one `pycocotools.mask.iou` call (regular IoU, also for crowd ground truth, as the official
  code) and are recovered exactly from the IoU and the two areas, with a check and an exact
  `mask.merge` fallback.
- Area ranges (all / small / medium / large = [0, 1e10] / [0, 128²] / [128², 256²] / [256², 1e10],
  both ends inclusive) test a track's mean area over the frames with a non-zero area (0 if none). For
  a detection the areas are its mask areas. For a ground truth they are the annotation's own `areas`
  list from the file (falsy entries, i.e. null and 0, left out), like the official code; the mask
  areas only when the file has no `areas`.
- Per video and category: detections sorted by score (stable, ties keep file order), the best 100
  kept; for each IoU threshold (np.linspace(.5, .95, 10)) greedy matching in score order to the
  still-unmatched ground truth with the highest IoU >= threshold (equal IoU: the later one wins),
  non-ignored ground truth first. Crowd ground truth is always ignored and can absorb any number of
  detections. A ground truth is ignored outside the area range; an unmatched detection outside it is
  ignored.
- Accumulation per category, area range and maxDets (1, 10, 100 per video per category): the first
  maxDets detections of each video (videos in id order) are stable-sorted by score, precision is made
  monotone and sampled at the 101 recall thresholds np.linspace(0, 1, 101). A category without a
  non-ignored ground truth gets -1 and is left out of the means; a number with nothing to average
  is -1.
- One inherited quirk kept on purpose so that the numbers are equal: like COCO, the official code
  records a match by the ground truth's `id`, so a detection matched to a ground truth with id 0
  counts as unmatched (a false positive). Ground-truth ids should start at 1, as in YouTube-VIS.
- Results are validated before anything is computed (`validate_results`): the official code silently
  truncates or crashes on bad files, this module names every offending entry instead.
"""

import numbers
from collections import defaultdict

import numpy as np
from pycocotools import mask as mask_utils

from efficientvis.errors import UserError
from efficientvis.ytvis import format as ytvis_format
from efficientvis.ytvis.results import PARTIAL_SUFFIX, check_output_file, read_partial, write_json_atomic

# Built exactly as the official / pycocotools Params (the float values matter at equality:
# IOU_THRESHOLDS[8] is 0.8999999999999999 and RECALL_THRESHOLDS[70] is 0.7000000000000001).
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
MAX_DETS = (1, 10, 100)
AREA_LABELS = ("all", "small", "medium", "large")
AREA_RANGES = ((0 ** 2, 1e5 ** 2), (0 ** 2, 128 ** 2), (128 ** 2, 256 ** 2), (256 ** 2, 1e5 ** 2))

# name, AP (True) or AR, IoU threshold (None: mean over all), area label, maxDets
SUMMARY = (
    ("AP", True, None, "all", 100),
    ("AP50", True, .5, "all", 100),
    ("AP75", True, .75, "all", 100),
    ("APs", True, None, "small", 100),
    ("APm", True, None, "medium", 100),
    ("APl", True, None, "large", 100),
    ("AR1", False, None, "all", 1),
    ("AR10", False, None, "all", 10),
    ("AR100", False, None, "all", 100),
    ("ARs", False, None, "small", 100),
    ("ARm", False, None, "medium", 100),
    ("ARl", False, None, "large", 100),
)
METRIC_NAMES = tuple(s[0] for s in SUMMARY)
MAX_LISTED = 10  # offending result entries named in one validation error


class _Det:
    """One validated result entry: a detection track."""
    __slots__ = ("index", "video_id", "category_id", "score", "rles", "areas", "mean_area")

    def __init__(self, index, video_id, category_id, score, rles):
        self.index = index
        self.video_id = video_id
        self.category_id = category_id
        self.score = score
        self.rles = rles  # per frame: {"size", "counts" (bytes)} or None
        self.areas = None  # (length,) float64 mask areas, 0 where absent
        self.mean_area = 0.0


class _Bad(Exception):
    pass


def _is_int(value) -> bool:
    return type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


def _frame_rle(seg, height, width, t):
    """A result's segmentation of frame t -> RLE dict with bytes counts, or None if absent."""
    if ytvis_format.is_absent(seg):
        return None
    if not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
        raise _Bad(f"frame {t}: expected a compressed RLE {{size, counts}} or null")
    size = seg["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(s) for s in size)):
        raise _Bad(f"frame {t}: invalid RLE size {size!r}")
    if [int(size[0]), int(size[1])] != [height, width]:
        raise _Bad(f"frame {t}: RLE size {list(size)} differs from the video size "
                   f"[{height}, {width}]")
    counts = seg["counts"]
    if not (isinstance(counts, (str, bytes)) or (isinstance(counts, list) and all(_is_int(c) for c in counts))):
        raise _Bad(f"frame {t}: RLE counts must be a string")
    problem = ytvis_format.rle_problem(counts, height, width)
    if problem:
        raise _Bad(f"frame {t}: invalid RLE ({problem})")
    if isinstance(counts, str):
        return {"size": [height, width], "counts": counts.encode("ascii")}
    if isinstance(counts, bytes):
        return {"size": [height, width], "counts": counts}
    return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)  # uncompressed


def _check_entry(index, entry, gt, category_ids):
    if not isinstance(entry, dict):
        raise _Bad(f"not an object ({type(entry).__name__})")
    missing = [k for k in ("video_id", "category_id", "score", "segmentations") if k not in entry]
    if missing:
        raise _Bad(f"missing field(s) {', '.join(missing)}")
    video_id = entry["video_id"]
    video = gt.videos.get(int(video_id)) if _is_int(video_id) else None
    if video is None:
        raise _Bad(f"unknown video_id {video_id!r}")
    category_id = entry["category_id"]
    if not (_is_int(category_id) and int(category_id) in category_ids):
        raise _Bad(f"unknown category_id {category_id!r}")
    score = entry["score"]
    if not isinstance(score, numbers.Real) or isinstance(score, bool) or score != score:
        raise _Bad(f"score {score!r} is not a number")
    segs = entry["segmentations"]
    if not isinstance(segs, list):
        raise _Bad("segmentations must be a list with one RLE or null per frame")
    if len(segs) != video.length:
        raise _Bad(f"{len(segs)} segmentations for the {video.length} frames of the video")
    rles = [_frame_rle(s, video.height, video.width, t) for t, s in enumerate(segs)]
    return _Det(index, video.id, int(category_id), float(score), rles)


def validate_results(gt: ytvis_format.Dataset, results, path: str = "results") -> list:
    """Check a results list against the ground truth; raise ONE UserError naming the offending
    entries (the first few, plus a count). Returns the validated detections (internal records)."""
    if not isinstance(results, list):
        raise UserError(f"{path}: expected a JSON list of results "
                        f"{{video_id, category_id, score, segmentations}}, got "
                        f"{type(results).__name__}")
    category_ids = set(gt.category_ids)
    dets, problems = [], []
    for i, entry in enumerate(results):
        try:
            dets.append(_check_entry(i, entry, gt, category_ids))
        except _Bad as e:
            where = f"entry {i}"
            if isinstance(entry, dict) and "video_id" in entry:
                where += f" (video {entry['video_id']!r})"
            problems.append(f"{where}: {e}")
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise UserError(f"{path}: {len(problems)} invalid result entr"
                        f"{'y' if len(problems) == 1 else 'ies'} of {len(results)}: {shown}{more}")
    return dets


def track_entries(gt: ytvis_format.Dataset, results, path: str = "results") -> dict:
    """{video id: [detection]}: one validated entry per track. The top-k entries of one track share
    its masks, so entries with identical masks are one track, represented by its highest-scoring
    entry (whose category is the track's argmax class)."""
    groups = {}
    for det in validate_results(gt, results, path):
        key = tuple(None if r is None else bytes(r["counts"]) for r in det.rles)
        best = groups.setdefault(det.video_id, {}).get(key)
        if best is None or det.score > best.score:
            groups[det.video_id][key] = det
    return {vid: list(tracks.values()) for vid, tracks in groups.items()}


def _mean_truthy(values, where: str) -> float:
    """The official `avg_area`: mean of the truthy entries (null and 0 left out), 0 if none."""
    kept = [a for a in values if a]
    if any(not isinstance(a, numbers.Real) or isinstance(a, bool) for a in kept):
        raise UserError(f"{where}: `areas` must hold numbers or null")
    return float(np.array(kept).mean()) if kept else 0.0


def _gt_mean_area(track, video) -> float:
    if track.file_areas is not None:
        return _mean_truthy(track.file_areas, f"{video.describe()} annotation {track.id}")
    return _mean_truthy(list(track.areas), "")


def _as_bytes(rle):
    if rle is None:
        return None
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": rle["size"], "counts": counts}


def _frame_intersections(d_rles, g_rles, d_areas, g_areas):
    """Exact integer intersections (len(d) x len(g)) of one frame's present masks."""
    iou = np.asarray(mask_utils.iou(d_rles, g_rles, [0] * len(g_rles)), np.float64)
    iou = iou.reshape(len(d_rles), len(g_rles))
    total = d_areas[:, None] + g_areas[None, :]
    inter = np.rint(iou * total / (1.0 + iou))
    union = total - inter
    # pycocotools returns (double)i / (double)u, or 0 when i == 0: check the recovered integers
    # reproduce it bit for bit (the map i -> i / (total - i) is one-to-one at these sizes).
    ok = np.where(inter > 0, inter / np.where(union > 0, union, 1.0) == iou, iou == 0)
    ok &= (inter >= 0) & (inter <= np.minimum(d_areas[:, None], g_areas[None, :]))
    if not ok.all():
        for i, j in zip(*np.nonzero(~ok)):
            inter[i, j] = mask_utils.area(mask_utils.merge([d_rles[i], g_rles[j]], intersect=True))
    return inter


def _video_ious(dets, gts, gt_rles, gt_areas, length):
    """(len(dets), len(gts)) video IoU of every detection with every ground truth."""
    inter = np.zeros((len(dets), len(gts)), np.float64)
    for t in range(length):
        di = [i for i, d in enumerate(dets) if d.rles[t] is not None]
        if not di:
            continue
        gi = [j for j in range(len(gts)) if gt_rles[j][t] is not None]
        if not gi:
            continue
        inter[np.ix_(di, gi)] += _frame_intersections(
            [dets[i].rles[t] for i in di], [gt_rles[j][t] for j in gi],
            np.array([dets[i].areas[t] for i in di]), gt_areas[gi, t])
    union = (np.array([d.areas.sum() for d in dets])[:, None]
             + gt_areas.sum(axis=1)[None, :] - inter)
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _match(ious, gt_ignore, gt_crowd, gt_id_nonzero):
    """Greedy matching at every IoU threshold (gts already sorted non-ignored first).
    Returns (T, D) bool 'matched' (as the official dtm truthiness) and (T, D) bool ignore."""
    n_det, n_gt = ious.shape
    matched = np.zeros((len(IOU_THRESHOLDS), n_det), bool)
    ignored = np.zeros((len(IOU_THRESHOLDS), n_det), bool)
    if n_det == 0 or n_gt == 0:
        return matched, ignored
    rows = ious.tolist()
    for ti, thr in enumerate(IOU_THRESHOLDS.tolist()):
        taken = [False] * n_gt
        for di, row in enumerate(rows):
            best, m = min(thr, 1 - 1e-10), -1
            for gi in range(n_gt):
                if taken[gi] and not gt_crowd[gi]:
                    continue
                if m > -1 and not gt_ignore[m] and gt_ignore[gi]:
                    break
                if row[gi] < best:
                    continue
                best, m = row[gi], gi
            if m == -1:
                continue
            ignored[ti, di] = gt_ignore[m]
            matched[ti, di] = gt_id_nonzero[m]
            taken[m] = True
    return matched, ignored


def _evaluate_pair(dets, ious, gt_tracks, gt_means):
    """Per area range: (scores (D,), matched (T, D), ignored (T, D), gt_ignore (G,))."""
    scores = np.array([d.score for d in dets], np.float64)
    det_means = np.array([d.mean_area for d in dets], np.float64)
    crowd = np.array([bool(g.iscrowd) for g in gt_tracks], bool)
    ids_nonzero = np.array([g.id != 0 for g in gt_tracks], bool)
    out = []
    for lo, hi in AREA_RANGES:
        raw_ignore = crowd | (gt_means < lo) | (gt_means > hi)
        order = np.argsort(raw_ignore.astype(np.int64), kind="mergesort")
        gt_ignore = raw_ignore[order]
        matched, ignored = _match(ious[:, order], gt_ignore.tolist(), crowd[order].tolist(),
                                  ids_nonzero[order].tolist())
        outside = (det_means < lo) | (det_means > hi)
        ignored |= ~matched & outside[None, :]
        out.append((scores, matched, ignored, gt_ignore))
    return out


def _accumulate(per_cat, n_cats):
    """precision (T, R, K, A, M) and recall (T, K, A, M), -1 where undefined (official layout)."""
    T, R, A, M = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(AREA_RANGES), len(MAX_DETS)
    precision = -np.ones((T, R, n_cats, A, M))
    recall = -np.ones((T, n_cats, A, M))
    for k, entries in enumerate(per_cat):  # entries: per video (id order) a list over area ranges
        if not entries:
            continue
        for a in range(A):
            gt_ignore = np.concatenate([e[a][3] for e in entries])
            n_pos = int(np.count_nonzero(gt_ignore == 0))
            if n_pos == 0:
                continue
            for m, max_det in enumerate(MAX_DETS):
                scores = np.concatenate([e[a][0][:max_det] for e in entries])
                order = np.argsort(-scores, kind="mergesort")
                matched = np.concatenate([e[a][1][:, :max_det] for e in entries], axis=1)[:, order]
                ignored = np.concatenate([e[a][2][:, :max_det] for e in entries], axis=1)[:, order]
                tps = matched & ~ignored
                fps = ~matched & ~ignored
                tp_sum = np.cumsum(tps, axis=1).astype(np.float64)
                fp_sum = np.cumsum(fps, axis=1).astype(np.float64)
                n_det = tp_sum.shape[1]
                for t in range(T):
                    tp, fp = tp_sum[t], fp_sum[t]
                    rc = tp / n_pos
                    pr = tp / (fp + tp + np.spacing(1))
                    recall[t, k, a, m] = rc[-1] if n_det else 0
                    q = np.zeros(R)
                    if n_det:
                        pr = np.maximum.accumulate(pr[::-1])[::-1]
                        inds = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
                        valid = inds < n_det
                        q[valid] = pr[inds[valid]]
                    precision[t, :, k, a, m] = q
    return precision, recall


def _summarize(precision, recall) -> dict:
    stats = {}
    for name, is_ap, iou_thr, area, max_dets in SUMMARY:
        aind = [i for i, label in enumerate(AREA_LABELS) if label == area]
        mind = [i for i, md in enumerate(MAX_DETS) if md == max_dets]
        s = precision if is_ap else recall
        if iou_thr is not None:
            s = s[np.where(iou_thr == IOU_THRESHOLDS)[0]]
        s = s[:, :, :, aind, mind] if is_ap else s[:, :, aind, mind]
        kept = s[s > -1]
        stats[name] = float(np.mean(kept)) if len(kept) else -1.0
    return stats


def evaluate(gt: ytvis_format.Dataset, results: list, path: str = "results") -> dict:
    """The 12 official YouTube-VIS numbers {"AP", "AP50", ..., "ARl"} of a results list (validated
    first, see `validate_results`); -1 where undefined."""
    dets = validate_results(gt, results, path)
    max_det = MAX_DETS[-1]
    cat_ids = sorted(set(gt.category_ids))
    cat_index = {c: k for k, c in enumerate(cat_ids)}
    dets_by = defaultdict(lambda: defaultdict(list))  # video -> category -> [det] in file order
    for d in dets:
        dets_by[d.video_id][d.category_id].append(d)
    per_cat = [[] for _ in cat_ids]  # k -> per video (id order): per area range tuple

    for vid in sorted(gt.videos):
        video = gt.videos[vid]
        tracks_by = defaultdict(list)
        for track in gt.tracks.get(vid, []):
            tracks_by[track.category_id].append(track)
        video_dets = dets_by.get(vid, {})
        cats = sorted(set(tracks_by) | set(video_dets))
        kept = {}
        for c in cats:  # sort by score (stable: file order on ties), keep the best 100
            cand = video_dets.get(c, [])
            order = np.argsort([-d.score for d in cand], kind="mergesort")
            kept[c] = [cand[i] for i in order[:max_det]]
            for d in kept[c]:
                if d.areas is None:
                    d.areas = _frame_areas(d.rles)
                    d.mean_area = _mean_truthy(d.areas.tolist(), "")
        # IoU of every kept detection with every ground truth of the video (one pass over frames)
        need_d = [d for c in cats if tracks_by.get(c) for d in kept[c]]
        need_g = [g for c in cats if kept[c] for g in tracks_by.get(c, [])]
        if need_d and need_g:
            g_rles = [[_as_bytes(r) for r in g.segmentations] for g in need_g]
            g_areas = np.array([g.areas for g in need_g], np.float64).reshape(
                len(need_g), video.length)
            all_ious = _video_ious(need_d, need_g, g_rles, g_areas, video.length)
            d_pos = {id(d): i for i, d in enumerate(need_d)}
            g_pos = {id(g): j for j, g in enumerate(need_g)}
        for c in cats:
            gts, ds = tracks_by.get(c, []), kept[c]
            if gts and ds:
                ious = all_ious[np.ix_([d_pos[id(d)] for d in ds], [g_pos[id(g)] for g in gts])]
            else:
                ious = np.zeros((len(ds), len(gts)))
            gt_means = np.array([_gt_mean_area(g, video) for g in gts], np.float64)
            per_cat[cat_index[c]].append(_evaluate_pair(ds, ious, gts, gt_means))

    precision, recall = _accumulate(per_cat, len(cat_ids))
    return _summarize(precision, recall)


# pycocotools' area() of a list of 256 or more RLEs fails ("out of bounds for uint8" with numpy 2,
# pycocotools 2.0.11): a track in view for 256+ frames of a long video
_AREA_CHUNK = 255


def _frame_areas(rles) -> np.ndarray:
    present = [t for t, r in enumerate(rles) if r is not None]
    areas = np.zeros(len(rles), np.float64)
    if present:
        masks = [rles[t] for t in present]
        areas[present] = np.concatenate([mask_utils.area(masks[i:i + _AREA_CHUNK])
                                         for i in range(0, len(masks), _AREA_CHUNK)])
    return areas


# ---------------------------------------------------------------- command line

_DESCRIPTIONS = {
    "AP": ("AP", "0.50:0.95", "all", 100), "AP50": ("AP", "0.50", "all", 100),
    "AP75": ("AP", "0.75", "all", 100), "APs": ("AP", "0.50:0.95", "small", 100),
    "APm": ("AP", "0.50:0.95", "medium", 100), "APl": ("AP", "0.50:0.95", "large", 100),
    "AR1": ("AR", "0.50:0.95", "all", 1), "AR10": ("AR", "0.50:0.95", "all", 10),
    "AR100": ("AR", "0.50:0.95", "all", 100), "ARs": ("AR", "0.50:0.95", "small", 100),
    "ARm": ("AR", "0.50:0.95", "medium", 100), "ARl": ("AR", "0.50:0.95", "large", 100),
}


def format_table(metrics: dict) -> str:
    """The 12 numbers as the official summary lines, each prefixed with its short name."""
    lines = []
    for name in METRIC_NAMES:
        kind, iou, area, max_dets = _DESCRIPTIONS[name]
        title = "Average Precision" if kind == "AP" else "Average Recall"
        lines.append(f"{name:<6} {title:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6s} | "
                     f"maxDets={max_dets:>3d} ] = {metrics[name]:0.4f}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--gt", required=True, help="YouTube-VIS annotation JSON (ground truth)")
    parser.add_argument("--results", required=True,
                        help="results JSON: list of {video_id, category_id, score, segmentations}")
    parser.add_argument("--json", default=None, help="also write the 12 numbers to this JSON file")


def run(args) -> int:
    if args.json:
        check_output_file(args.json, "--json")
    gt = ytvis_format.load(args.gt)
    if args.results.endswith(PARTIAL_SUFFIX):  # what a stopped `evis infer` / `evis run --dataset` kept
        finished, results = read_partial(args.results)
        if not finished:
            raise UserError(f"{args.results}: no finished video yet (the run stopped in its first video)")
        missing = [v for v in finished if v not in gt.videos]
        if missing:
            raise UserError(f"{args.results}: video_id {missing[0]} is not in {args.gt}")
        print(f"{args.results}: a partial results file; the metric covers its {len(finished)} finished "
              f"video(s) of the {len(gt.videos)} in {args.gt}")
        gt = gt.subset(finished)
    else:
        results = ytvis_format.read_json(args.results, "results file")
    metrics = evaluate(gt, results, args.results)
    n_tracks = sum(len(t) for t in gt.tracks.values())
    print(f"YouTube-VIS metric: {len(gt.videos)} videos, {n_tracks} ground-truth tracks, "
          f"{len(results)} results")
    print(format_table(metrics))
    if args.json:
        write_json_atomic(args.json, metrics)
        print(f"wrote {args.json}")
    return 0
