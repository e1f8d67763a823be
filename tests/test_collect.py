"""The runtime's results collector: the same results as the scoring rule on whole arrays, written
entry by entry, with memory that does not grow with the video's length."""

import json
import tracemalloc

import numpy as np
import pytest

from efficientvis.runtime.clip_loop import FrameResult, Instance
from efficientvis.runtime.collect import TrackCollector
from efficientvis.ytvis.metric import evaluate  # noqa: F401  (the package's metric imports first)
from efficientvis.errors import UserError
from efficientvis.ytvis.results import ResultsWriter, recover, video_results


def _moving_tracks(rng, K=4, T=40, H=48, W=64, classes=3):
    """K tracks of moving rectangles (some frames empty, one track never visible) + class probs."""
    masks = np.zeros((K, T, H, W), bool)
    for k in range(K - 1):
        for t in range(T):
            if rng.random() < 0.15:
                continue  # absent on this frame
            y, x = (3 * k + t) % (H - 10), (5 * k + 2 * t) % (W - 12)
            masks[k, t, y:y + 6 + k, x:x + 8 + k] = True
    probs = rng.dirichlet(np.ones(classes), size=(K, T)).astype(np.float32)
    return masks, probs


def _collect(masks, probs, length, **kwargs):
    K, T = masks.shape[:2]
    collector = TrackCollector(length, probs.shape[2], **kwargs)
    for t in range(T):
        instances = [Instance(track_id=k + 1, class_probs=probs[k, t], box=np.zeros(4), mask=masks[k, t])
                     for k in range(K)]  # every track reports every frame: empty masks count as absent
        collector.add(FrameResult(index=t, frame=None, instances=instances))
    return collector


@pytest.mark.parametrize("spool_in_memory", [1 << 20, 256])  # in memory / spilled to disk
@pytest.mark.parametrize("classes", [3, 1])  # one class: scores must round alike too
def test_collector_gives_the_scoring_rule_results(spool_in_memory, classes):
    masks, probs = _moving_tracks(np.random.default_rng(0), classes=classes)
    collector = _collect(masks, probs, masks.shape[1], spool_in_memory=spool_in_memory)
    category_ids = [3, 5, 9][:classes]
    got = list(collector.results(7, category_ids, top_k=6))
    want = video_results(7, masks, probs, category_ids, top_k=6)
    assert len(got) == min(6, 3 * classes)
    assert got == want
    assert collector._spool._rolled == (spool_in_memory == 256)
    collector.close()


def test_collector_memory_does_not_grow_with_the_video():
    H, W, T, K = 128, 192, 1500, 10
    collector = TrackCollector(None, 6)
    probs = np.random.default_rng(1).dirichlet(np.ones(6), size=K).astype(np.float32)
    frame = np.zeros((H, W), bool)
    tracemalloc.start()
    try:
        for t in range(T):
            instances = []
            for k in range(K):
                mask = frame.copy()
                y, x = (7 * k + t) % (H - 40), (11 * k + 3 * t) % (W - 50)
                mask[y:y + 24 + k:2, x:x + 40] = True  # striped: long RLEs
                instances.append(Instance(track_id=k + 1, class_probs=probs[k], box=np.zeros(4), mask=mask))
            collector.add(FrameResult(index=t, frame=None, instances=instances))
            if t == 100:
                warm, _ = tracemalloc.get_traced_memory()
        grown, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        entries = 0
        for entry in collector.results(1, list(range(1, 7)), top_k=10):
            assert len(entry["segmentations"]) == T and all(s is not None for s in entry["segmentations"])
            json.dumps(entry)
            entry = None  # as ResultsWriter.add does  # noqa: F841
            entries += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    spooled = collector._spool.tell()  # the RLE text of all the video's masks, on disk
    assert collector._spool._rolled and spooled > 10_000_000
    assert grown - warm < 100_000  # flat while collecting: a few numbers per track
    assert entries == 10
    assert peak - grown < spooled // 2  # while writing: one track's masks at a time
    collector.close()


def test_writer_streams_entries_and_drops_a_video_cut_off_by_an_error(tmp_path):
    masks, probs = _moving_tracks(np.random.default_rng(2))
    path = str(tmp_path / "results.json")

    def failing(entries):
        yield next(iter(entries))
        raise RuntimeError("killed mid-video")

    with pytest.raises(RuntimeError):
        with ResultsWriter(path) as writer:
            writer.add(1, _collect(masks, probs, 40).results(1, [1, 2, 3], top_k=3))
            writer.add(2, failing(_collect(masks, probs, 40).results(2, [1, 2, 3], top_k=3)))
    with open(path + ".partial") as f:
        lines = f.read().split("\n")
    assert len(lines) == 2 and lines[1] == ""  # video 1 complete; nothing of video 2
    recover(path + ".partial")
    results = json.load(open(path))
    assert [r["video_id"] for r in results] == [1, 1, 1]
    assert results == video_results(1, masks, probs, [1, 2, 3], top_k=3)


def test_recover_refuses_a_half_line_spliced_into_the_next(tmp_path):
    """A write that failed mid-video and was not truncated (disk full) must not make an invalid
    results file: the spliced line is named instead."""
    partial = tmp_path / "results.json.partial"
    partial.write_text('{"video_id": 1, "results": [{"video_id": 1, "categ'
                       '{"video_id": 2, "results": []}\n')
    with pytest.raises(UserError, match="line 1 is not a video's results"):
        recover(str(partial))
