"""Whole YouTube-VIS splits through the clip loop, to one results file (`evis run --dataset`,
`evis infer`, `evis parity`): the same loop, collector and writer whatever the backend, so a
PyTorch and an ONNX Runtime/TensorRT results file differ only by what the graphs compute."""

import os

from tqdm import tqdm

from efficientvis.errors import UserError

from efficientvis.runtime.clip_loop import run_clips
from efficientvis.runtime.collect import TrackCollector
from efficientvis.ytvis import format as ytvis_format
from efficientvis.ytvis.results import ResultsWriter


def check_class_names(gt, class_names, ann, whose="model's"):
    """UserError when the annotations' categories are not the model's classes (names, in order)."""
    if class_names and list(class_names) != gt.category_names:
        raise UserError(f"{ann}: categories {gt.category_names} differ from the {whose} classes "
                        f"{list(class_names)}")


def load_split(folder, ann=None, flag="--data", class_names=None, whose="model's"):
    """A YouTube-VIS split folder (JPEGImages/ + annotations.json, or `ann`) -> (Dataset, annotation
    path, image root); a missing part, or categories other than `class_names`, is a UserError."""
    ann = ann or os.path.join(folder, "annotations.json")
    image_root = os.path.join(folder, "JPEGImages")
    if not os.path.isfile(ann):
        raise UserError(f"annotation file not found: {ann} ({flag} DIR must hold JPEGImages/ and "
                        f"annotations.json, or give --ann)")
    if not os.path.isdir(image_root):
        raise UserError(f"image folder not found: {image_root}")
    gt = ytvis_format.load(ann)
    check_class_names(gt, class_names, ann, whose)
    return gt, ann, image_root


def video_frames(video, image_root):
    """BGR frames of a dataset video, read one by one (a missing or broken JPEG is a UserError)."""
    return (ytvis_format.read_frame(image_root, video, t, rgb=False) for t in range(video.length))


def run_video(backend, frames, length, options, num_classes, linker=None):
    """One video's frames through the clip loop -> its TrackCollector."""
    collector = TrackCollector(length, num_classes)
    for frame_result in run_clips(backend, frames, options, linker):
        collector.add(frame_result)
    return collector


def run_dataset(backend, gt, image_root, options, out_path, num_classes, category_ids, top_k,
                make_linker=None, progress=True):
    """Every video of `gt` (a format.Dataset) -> YouTube-VIS results at out_path, written video by
    video (atomic: an interrupted run leaves the videos done so far, never a half file)."""
    writer = ResultsWriter(out_path)
    try:
        with writer:
            for video in tqdm(list(gt.videos.values()), desc="videos", disable=not progress, dynamic_ncols=True):
                linker = make_linker() if make_linker else None
                with run_video(backend, video_frames(video, image_root), video.length, options,
                               num_classes, linker) as collector:
                    writer.add(video.id, collector.results(video.id, category_ids, top_k))
    except UserError as e:  # say where the finished videos are
        if not writer.videos:
            raise
        raise UserError(f"{e} (the {writer.videos} finished video(s) are kept in {writer.partial_path}; "
                        f"`evis eval --gt {gt.path or 'ANNOTATIONS'} --results {writer.partial_path}` scores them)") from None
    return out_path
