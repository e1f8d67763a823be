"""Contact sheet of a YouTube-VIS dataset: a grid of videos x frames with per-instance mask overlays.

Works on any YouTube-VIS annotation file (images from JPEGImages, or frames decoded from one mp4
for the synthetic long video). Each instance gets a fixed colour from its annotation id, a
translucent fill, an outline and a label "<annotation id>:<class name>"; the first tile of a row
names the video, every tile shows its frame index. Drawn with OpenCV, written as PNG.
"""

import os

import cv2
import numpy as np

from efficientvis.errors import UserError
from efficientvis.ytvis import format as ytvis_format


def _colour(track_id: int):
    """Distinct, stable BGR colour for an instance id (golden-ratio hue walk)."""
    hue = int((track_id * 0.618033988749895 % 1.0) * 180)
    hsv = np.uint8([[[hue, 220, 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def _text(image, text, org, scale=0.4, colour=(255, 255, 255)):
    cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def overlay(image, tracks, frame, names, alpha=0.3):
    """Copy of image with the masks of `tracks` at `frame` drawn on it."""
    out = image.astype(np.float32)
    h, w = image.shape[:2]
    labels = []
    for track in tracks:
        rle = track.segmentations[frame]
        if rle is None:
            continue
        mask = ytvis_format.decode(rle, h, w).astype(bool)
        if not mask.any():
            continue
        colour = np.array(_colour(track.id), np.float32)
        out[mask] = out[mask] * (1 - alpha) + colour * alpha
        ys, xs = np.nonzero(mask)
        labels.append((track, mask, int(xs.min()), int(ys.min())))
    out = np.clip(out, 0, 255).astype(np.uint8)
    for track, mask, x, y in labels:
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, _colour(track.id), 1)
    for track, mask, x, y in labels:
        text = f"{track.id}:{names.get(track.category_id, track.category_id)}"
        _text(out, text, (min(max(x, 1), max(w - 7 * len(text), 1)), max(y - 3, 10)),
              colour=_colour(track.id))
    return out


def _read_mp4(path, wanted):
    """{frame index: BGR image} for the wanted indices, decoding sequentially."""
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise UserError(f"cannot open video {path}")
    frames, index, last = {}, 0, max(wanted)
    try:
        while index <= last:
            ok, image = capture.read()
            if not ok:
                break
            if index in wanted:
                frames[index] = image
            index += 1
    finally:
        capture.release()
    return frames


def contact_sheet(annotations, out_png, image_root=None, video_file=None, videos=5, frames=6):
    """Write a PNG grid (rows: videos with the most instances first; columns: evenly spaced frames).

    annotations: path of a YouTube-VIS JSON. image_root: folder holding the file_names (default:
    JPEGImages next to the JSON). video_file: read the frames of the (single) video from this mp4.
    Returns out_png.
    """
    dataset = ytvis_format.load(annotations)
    if image_root is None:
        image_root = os.path.join(os.path.dirname(os.path.abspath(annotations)), "JPEGImages")
    names = {c["id"]: c["name"] for c in dataset.categories}
    chosen = sorted(dataset.videos.values(), key=lambda v: (-len(dataset.tracks[v.id]), v.id))[:videos]
    if not chosen:
        raise UserError(f"{annotations}: no videos to preview")
    rows = []
    tile_h = max(v.height for v in chosen)
    tile_w = max(v.width for v in chosen)
    for video in chosen:
        picks = sorted({int(round(i)) for i in np.linspace(0, video.length - 1, frames)})
        if video_file:
            images = _read_mp4(video_file, set(picks))
        else:
            images = {t: ytvis_format.read_frame(image_root, video, t, rgb=False) for t in picks}
        tiles = []
        for j, t in enumerate(picks):
            tile = np.zeros((tile_h, tile_w, 3), np.uint8)
            if t in images:
                drawn = overlay(images[t], dataset.tracks[video.id], t, names)
                tile[:drawn.shape[0], :drawn.shape[1]] = drawn
            label = f"t={t}"
            _text(tile, label, (tile_w - 8 * len(label) - 2, tile_h - 6))
            if j == 0:
                _text(tile, os.path.dirname(video.file_names[0]) or str(video.id), (3, tile_h - 6),
                      colour=(0, 255, 255))
            tiles.append(tile)
        while len(tiles) < frames:
            tiles.append(np.zeros((tile_h, tile_w, 3), np.uint8))
        rows.append(np.concatenate([np.pad(t, ((1, 1), (1, 1), (0, 0))) for t in tiles], 1))
    sheet = np.concatenate(rows, 0)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder of {out_png} ({e.strerror or e})") from None
    if not cv2.imwrite(str(out_png), sheet):
        raise UserError(f"cannot write preview {out_png} (use a .png path)")
    return out_png
