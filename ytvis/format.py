"""YouTube-VIS annotation format (2019, 2021 and OVIS share it): load, validate, normalise.

Every segmentation is normalised on load to a compressed RLE (pycocotools' dict with `counts` as
bytes/str and `size` = [height, width]) or None for a frame where the instance is absent. Polygons,
uncompressed RLE and compressed RLE are accepted. Errors name the video, the frame and the annotation.
"""

import json
import os
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from efficientvis.errors import UserError


@dataclass
class Video:
    id: int
    width: int
    height: int
    file_names: list  # relative path of each frame under the image root

    @property
    def length(self) -> int:
        return len(self.file_names)

    def describe(self, frame=None) -> str:
        """'video 3 (abc)' or 'video 3 (abc) frame 7 (abc/00035.jpg)' for error messages."""
        folder = os.path.dirname(self.file_names[0]) if self.file_names else "?"
        text = f"video {self.id} ({folder})"
        if frame is not None:
            text += f" frame {frame} ({self.file_names[frame]})"
        return text


@dataclass
class Track:
    """One annotated instance through a whole video."""
    id: int
    video_id: int
    category_id: int
    iscrowd: int
    segmentations: list  # per frame: compressed RLE dict or None (absent)
    areas: np.ndarray = field(repr=False, default=None)  # (length,) float, 0 where absent
    # The annotation's own `areas` list as written in the file (None if it has none): the official
    # metric takes a ground truth's mean area for the area ranges from it, not from the masks.
    file_areas: list = field(repr=False, default=None)

    def present(self) -> np.ndarray:
        """(length,) bool: frames where the instance is visible (non-empty mask)."""
        return self.areas > 0

    def mean_area(self) -> float:
        """Mean area over present frames (0 if never present): the metric's area-range rule."""
        present = self.areas[self.areas > 0]
        return float(present.mean()) if len(present) else 0.0


@dataclass
class Dataset:
    videos: dict  # id -> Video, in file order
    tracks: dict  # video id -> [Track]
    categories: list  # [{id, name, supercategory}] sorted by id
    path: str = ""

    @property
    def category_ids(self) -> list:
        return [c["id"] for c in self.categories]

    @property
    def category_names(self) -> list:
        return [c["name"] for c in self.categories]

    def max_length(self) -> int:
        return max((v.length for v in self.videos.values()), default=0)

    def subset(self, video_ids) -> "Dataset":
        """The same dataset with only these videos (in this order) and their tracks."""
        return Dataset({v: self.videos[v] for v in video_ids}, {v: self.tracks.get(v, []) for v in video_ids},
                       self.categories, self.path)


def is_absent(segmentation) -> bool:
    """null, {} and [] mean 'not visible in this frame' (the official code's truthiness rule)."""
    return not segmentation


def rle_problem(counts, height: int, width: int):
    """Why an RLE's counts (COCO's compressed string/bytes, or the uncompressed list) do not
    describe a height x width mask, or None. pycocotools trusts them: counts that do not add up
    to height * width give a wrong IoU, and some make its iou/merge loop for ever.

    The compressed form (pycocotools' rleFrString) in numpy: each character is 48 + 5 bits, bit
    0x20 continues the number, the last character's 0x10 is its sign, and from the fourth count
    on each is stored as the difference to the count two before it."""
    if isinstance(counts, list):
        if any(not 0 <= c <= height * width for c in counts):  # also before int64 could overflow
            return "its counts hold a run that is negative or longer than the frame"
        runs = np.asarray(counts, dtype=np.int64) if counts else np.zeros(0, np.int64)
    else:
        if isinstance(counts, str):
            if not counts.isascii():
                return "its counts hold characters outside COCO's RLE alphabet"
            counts = counts.encode("ascii")
        raw = np.frombuffer(counts, np.uint8)
        if raw.size and (raw.min() < 48 or raw.max() > 48 + 63):
            return "its counts hold characters outside COCO's RLE alphabet"
        values = raw.astype(np.int64) - 48
        if values.size and values[-1] & 0x20:
            return "its counts end in the middle of a number"
        ends = np.flatnonzero((values & 0x20) == 0)
        starts = np.concatenate([[0], ends[:-1] + 1]) if ends.size else ends
        # pycocotools decodes into a 32-bit int: from the 7th character of a number on its value
        # differs from this one (and it writes 7 only for counts of 2^29 pixels and more)
        if ends.size and (ends - starts).max() >= 6:
            return "its counts hold a number longer than 6 characters"
        position = np.arange(values.size) - np.repeat(starts, ends - starts + 1)
        parts = (values & 0x1F) << (5 * position)
        runs = np.add.reduceat(parts, starts) if ends.size else np.zeros(0, np.int64)
        negative = (values[ends] & 0x10) != 0
        runs = np.where(negative, runs - (np.int64(1) << (5 * (ends - starts + 1))), runs)
        if runs.size > 3:  # counts[i] += counts[i - 2] for i > 2, i.e. two cumulative sums
            for first in (3, 4):
                runs[first - 2::2][1:] = np.cumsum(runs[first - 2::2])[1:]
    if runs.size and runs.min() < 0:
        return "its counts hold a negative run"
    if runs.size and runs.max() > height * width:
        return "its counts hold a run longer than the frame"
    if int(runs.sum()) != height * width:
        return f"its runs cover {int(runs.sum())} pixels, not {height}x{width} = {height * width}"
    return None


def to_rle(segmentation, height: int, width: int, where: str):
    """Any YouTube-VIS segmentation -> compressed RLE with `counts` as str, or None if absent."""
    if is_absent(segmentation):
        return None
    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        try:
            polygons = [p for p in segmentation if len(p) >= 6]
            if not polygons:
                return None
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: invalid polygon segmentation ({e})") from None
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(s) for s in segmentation["size"]]
        if size != [height, width]:
            raise UserError(f"{where}: RLE size {size} differs from the video size "
                            f"[{height}, {width}]")
        problem = rle_problem(segmentation["counts"], height, width) if isinstance(
            segmentation["counts"], (str, bytes, list)) else "its counts are not a string or a list"
        if problem:
            raise UserError(f"{where}: invalid RLE ({problem})")
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": size, "counts": segmentation["counts"]}
    else:
        raise UserError(f"{where}: unrecognised segmentation (expected polygons, RLE or null)")
    if isinstance(rle["counts"], bytes):
        rle["counts"] = rle["counts"].decode("ascii")
    return rle


def rle_area(rle) -> float:
    if rle is None:
        return 0.0
    return float(mask_utils.area(_as_bytes(rle)))


def _as_bytes(rle):
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode(rle, height: int, width: int) -> np.ndarray:
    """RLE or None -> (height, width) uint8 mask."""
    if rle is None:
        return np.zeros((height, width), np.uint8)
    return mask_utils.decode(_as_bytes(rle))


def encode(mask: np.ndarray) -> dict:
    """(H, W) bool/uint8 mask -> compressed RLE with `counts` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a JSON text file") from None


def _require(obj, keys, where):
    missing = [k for k in keys if k not in obj]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")


def parse(data: dict, path: str = "annotations") -> Dataset:
    """Validate and normalise a YouTube-VIS dict (ground truth; `annotations` may be absent).
    A field of the wrong type (a string width, annotations that are null, a list category_id)
    is one line naming the file, not a traceback."""
    try:
        return _parse(data, path)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise UserError(f"{path}: not a valid YouTube-VIS annotation file (a field of the wrong "
                        f"type: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def _parse(data, path):
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object with 'videos' and 'categories'")
    _require(data, ["videos", "categories"], path)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    category_ids = {c["id"] for c in categories}
    videos = {}
    for v in data["videos"]:
        _require(v, ["id", "width", "height", "file_names"], f"{path}: video {v.get('id', '?')}")
        if not isinstance(v["file_names"], list):
            raise UserError(f"{path}: video {v['id']}: file_names must be a list of frame paths")
        video = Video(int(v["id"]), int(v["width"]), int(v["height"]), list(v["file_names"]))
        if video.id in videos:
            raise UserError(f"{path}: duplicate video id {video.id}")
        if "length" in v and int(v["length"]) != video.length:
            raise UserError(f"{path}: {video.describe()} has length {v['length']} but "
                            f"{video.length} file_names")
        videos[video.id] = video
    tracks = {vid: [] for vid in videos}
    for a in data.get("annotations", []):
        where = f"{path}: annotation {a.get('id', '?')}"
        _require(a, ["id", "video_id", "category_id", "segmentations"], where)
        video = videos.get(a["video_id"])
        if video is None:
            raise UserError(f"{where}: unknown video_id {a['video_id']}")
        where = f"{path}: {video.describe()} annotation {a['id']}"
        if a["category_id"] not in category_ids:
            raise UserError(f"{where}: unknown category_id {a['category_id']} "
                            f"(categories: {sorted(category_ids)})")
        segs = a["segmentations"]
        if len(segs) != video.length:
            raise UserError(f"{where}: {len(segs)} segmentations for {video.length} frames "
                            f"(file_names)")
        rles = [to_rle(s, video.height, video.width, f"{path}: {video.describe(t)} annotation "
                       f"{a['id']}") for t, s in enumerate(segs)]
        track = Track(int(a["id"]), video.id, int(a["category_id"]), int(a.get("iscrowd", 0) or 0),
                      rles, np.array([rle_area(r) for r in rles], np.float64),
                      a["areas"] if isinstance(a.get("areas"), list) else None)
        tracks[video.id].append(track)
    return Dataset(videos, tracks, categories, path)


def load(path: str) -> Dataset:
    """Load and validate a YouTube-VIS annotation file."""
    return parse(read_json(path, "annotation file"), path)


def jpeg_is_complete(data: bytes) -> bool:
    """Whether a JPEG holds the end-of-image marker (FF D9) after its first start-of-scan (FF DA).

    The header segments are walked by their lengths, so an EXIF thumbnail's own FF D9 (inside
    APP1) does not count; coded scan data never holds FF D9, so the first one after the scan ends
    the main image. Anything after it (camera trailers, motion-photo videos, buffer padding) is
    allowed.
    """
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False  # not a marker where one must be: a damaged header
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:
            return data.find(b"\xff\xd9", i) >= 0
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def read_image(path: str) -> np.ndarray:
    """An image file as (h, w, 3) uint8 BGR; UserError naming the file if it cannot be read.

    cv2.imread decodes a truncated JPEG with grey where the data stops and only prints libjpeg's
    warning, so a cut-off download or copy would train and score silently. A JPEG must therefore
    hold its end-of-image marker after its first scan (jpeg_is_complete).
    """
    import cv2  # OpenCV is an extra of the base install

    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise UserError(f"cannot read image {path} ({e.strerror or e})") from None
    if data[:2].tobytes() == b"\xff\xd8" and not jpeg_is_complete(data.tobytes()):
        raise UserError(f"truncated JPEG {path} (no end-of-image marker)")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise UserError(f"cannot decode image {path}")
    return image


def read_frame(image_root: str, video: Video, t: int, rgb: bool = True) -> np.ndarray:
    """Frame t of a video as (h, w, 3) uint8 (RGB, or OpenCV's BGR); UserError naming video and frame."""
    import cv2

    path = os.path.join(image_root, video.file_names[t])
    if not os.path.isfile(path):
        raise UserError(f"{video.describe(t)}: missing image {path}")
    try:
        image = read_image(path)
    except UserError as e:
        raise UserError(f"{video.describe(t)}: {e}") from None
    if image.shape[:2] != (video.height, video.width):
        raise UserError(f"{video.describe(t)}: image {path} is {image.shape[1]}x{image.shape[0]} "
                        f"but the annotations say {video.width}x{video.height}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if rgb else image


def check_images(dataset: Dataset, image_root: str) -> None:
    """Every frame of every video exists under image_root (JPEGImages/<video>/<frame>.jpg)."""
    if not os.path.isdir(image_root):
        raise UserError(f"image folder not found: {image_root}")
    for video in dataset.videos.values():
        for t, name in enumerate(video.file_names):
            if not os.path.isfile(os.path.join(image_root, name)):
                raise UserError(f"{video.describe(t)}: missing image {os.path.join(image_root, name)}")
