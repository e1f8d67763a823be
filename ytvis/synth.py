"""Synthetic YouTube-VIS datasets: the built-in data of the demo, the tests and the benchmarks.

Every video is a textured, mildly cluttered background (smooth colour noise, a gradient, a few
unannotated distractor blobs and lines, a slow camera pan) with 1..max_objects textured shapes
moving over it. Six classes differ in shape AND texture AND colour family (the hue is jittered
inside the family, and distractors use any hue, so colour alone is not the class):

    id  name      shape                      texture                     colour family
    1   disc      circle                     parallel stripes (dark)     red
    2   square    square                     4x4 checkerboard (pale)     blue
    3   triangle  equilateral triangle       dot grid (dark)             green
    4   star      five-pointed star          radial gradient             yellow -> orange
    5   ring      annulus (hole = background) 8 radial spokes (pale)     cyan
    6   cross     plus sign                  diagonal hatching (dark)    magenta

Textures live in the object's frame: they rotate and scale with it. Objects move independently
(slow, medium and fast movers; bouncing inside the frame or crossing it so they enter/leave),
change scale smoothly, may rotate, and occlude each other by a fixed per-video z-order. Only the
VISIBLE part of an instance is annotated; a frame where it is fully occluded or outside the frame
is null. In about 40% of the videos with two or more objects, two instances of the SAME class cross
each other mid-clip, so identity has to be tracked rather than read off the class.

Determinism: video i of a split is drawn from numpy's Generator seeded with (seed, stream, i)
(stream 0 = train, 1 = valid, 2 = long video); the per-frame sensor noise is a crop of a per-video
noise bank picked by a generator seeded with (seed, stream, i, u). The output is byte-identical for
a seed whatever the number of worker processes.

Time: `stride` k renders frame t at underlying time u = t*k of a k-times longer video (low frame
rate, like YouTube-VIS annotating every 5th frame). Scene parameters depend on u only through the
underlying length frames*k, so (frames=n, stride=k) is exactly every k-th frame of (frames=n*k,
stride=1), and the JPEG of frame t is named after its underlying index: `<video>/<u:05d>.jpg`.

Layout written by `generate` / `evis synth --out DIR`:
    DIR/train/JPEGImages/train_00000/00000.jpg ...   DIR/train/annotations.json
    DIR/valid/JPEGImages/valid_00000/00000.jpg ...   DIR/valid/annotations.json   (--valid-videos)

Long video mode (`write_video` / `evis synth --video PATH.mp4 --frames 3000`): ONE video written
with OpenCV's VideoWriter (mp4v) while it is rendered (memory stays flat), plus PATH.json next to it
in the same schema. Its `file_names` are `<stem>/<u:05d>.jpg` names for the frames of the mp4 in
order; those JPEGs are NOT written (decode the mp4; frame i of the mp4 is entry i). In that mode
most objects stay in view for the whole video; now and then an extra object crosses the frame.

Tracks never visible in any frame are left out of the annotations (a ground truth that can never
be matched would only lower AP). Annotation ids are 1-based and sequential over the split.
"""

import colorsys
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from efficientvis.errors import UserError

CATEGORIES = [
    {"id": 1, "name": "disc", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "star", "supercategory": "shape"},
    {"id": 5, "name": "ring", "supercategory": "shape"},
    {"id": 6, "name": "cross", "supercategory": "shape"},
]
CATEGORY_NAMES = {c["id"]: c["name"] for c in CATEGORIES}

STREAMS = {"train": 0, "valid": 1, "video": 2}
JPEG_QUALITY = 90
GENERATOR_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Shapes and textures, in object units (radius 1 around the centre)

def _circle(n: int, r: float) -> np.ndarray:
    a = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _star(points=5, outer=1.15, inner=0.5) -> np.ndarray:
    a = np.arange(2 * points) * math.pi / points - math.pi / 2
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _cross(arm=1.05, half=0.36) -> np.ndarray:
    a, h = arm, half
    return np.array([[-h, -a], [h, -a], [h, -h], [a, -h], [a, h], [h, h], [h, a], [-h, a],
                     [-h, h], [-a, h], [-a, -h], [-h, -h]], np.float64)


_TRIANGLE = np.array([[math.cos(a) * 1.15, math.sin(a) * 1.15]
                      for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])

# class index (category id - 1) -> (outer polygon, hole polygon or None, texture, hue in degrees)
_CLASSES = [
    (_circle(48, 1.0), None, "stripes", 0.0),
    (np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]), None, "checker", 228.0),
    (_TRIANGLE, None, "dots", 120.0),
    (_star(), None, "radial", 50.0),
    (_circle(48, 1.0), _circle(40, 0.55), "spokes", 178.0),
    (_cross(), None, "hatch", 300.0),
]
_NOISE_FIELDS, _NOISE_PAD = 4, 32  # per-video bank of sensor-noise fields, cropped per frame
_EXTENT = 1.2  # every shape fits in a circle of this radius (object units)


def _texture(kind: str, x: np.ndarray, y: np.ndarray, phase: float) -> np.ndarray:
    """Mix weight in [0, 1] between the two colours of an object at local coordinates (x, y)."""
    if kind == "stripes":
        return np.clip(0.5 + 2.5 * np.sin(2 * math.pi * x / 0.5 + phase), 0.0, 1.0)
    if kind == "checker":
        p = 1.7 / 4
        return ((np.floor((x + 0.85) / p) + np.floor((y + 0.85) / p)) % 2).astype(np.float32)
    if kind == "dots":
        p = 0.42
        fx = ((x / p + phase) % 1.0 - 0.5) * p
        fy = ((y / p) % 1.0 - 0.5) * p
        return np.clip((0.13 ** 2 - fx * fx - fy * fy) * 400.0, 0.0, 1.0)
    if kind == "radial":
        return np.clip(np.sqrt(x * x + y * y) / 1.15, 0.0, 1.0) ** 1.3
    if kind == "spokes":
        return np.clip(0.5 + 2.5 * np.sin(8 * np.arctan2(y, x) + phase), 0.0, 1.0)
    if kind == "hatch":
        return np.clip((np.sin(2 * math.pi * (x + y) / 0.38 + phase) - 0.35) * 3.0, 0.0, 1.0)
    raise ValueError(kind)


def _bgr(h: float, s: float, v: float) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((h / 360.0) % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return np.array([b, g, r], np.float32) * 255.0


def _class_colours(rng, cls: int):
    """Main and secondary colour of one instance: the class's hue family, jittered."""
    hue = _CLASSES[cls][3] + rng.uniform(-12.0, 12.0)
    s, v = rng.uniform(0.6, 0.95), rng.uniform(0.65, 0.95)
    kind = _CLASSES[cls][2]
    main = _bgr(hue, s, v)
    if kind in ("stripes", "dots", "hatch"):  # dark pattern
        second = _bgr(hue + rng.uniform(-8, 8), s, v * rng.uniform(0.28, 0.42))
    elif kind in ("checker", "spokes"):  # pale pattern
        second = _bgr(hue, s * rng.uniform(0.08, 0.2), rng.uniform(0.88, 1.0))
    else:  # radial: centre bright, tips shifted towards orange and darker
        second = _bgr(hue - rng.uniform(18, 30), min(1.0, s + 0.1), v * rng.uniform(0.55, 0.7))
    return main, second


# ----------------------------------------------------------------------------------------------
# Scene: background + objects; render(u) -> image and visible masks

@dataclass
class _Object:
    cls: int  # 0-based class (category id - 1)
    r0: float  # base radius in pixels
    scale_amp: float
    scale_w: float
    scale_phase: float
    rot0: float
    rot_w: float
    p0: np.ndarray  # position at time u0 (before folding)
    u0: float
    v: np.ndarray  # pixels per underlying frame
    wob_amp: np.ndarray
    wob_w: float
    wob_phase: np.ndarray
    fold_lo: np.ndarray = None  # bounce range of the centre (None: free flight, may leave)
    fold_hi: np.ndarray = None
    main: np.ndarray = None
    second: np.ndarray = None
    tex_phase: float = 0.0

    def state(self, u: float):
        """(centre (2,), radius, angle) at underlying time u."""
        p = self.p0 + self.v * (u - self.u0) + self.wob_amp * np.sin(self.wob_w * u + self.wob_phase)
        if self.fold_lo is not None:
            span = self.fold_hi - self.fold_lo
            q = np.mod(p - self.fold_lo, 2 * span)
            p = self.fold_lo + np.where(q > span, 2 * span - q, q)
        radius = self.r0 * math.exp(self.scale_amp * math.sin(self.scale_w * u + self.scale_phase))
        return p, radius, self.rot0 + self.rot_w * u

    def max_radius(self) -> float:
        return self.r0 * math.exp(self.scale_amp)


@dataclass
class _Scene:
    height: int
    width: int
    background: np.ndarray  # (H + 2m, W + 2m, 3) float32
    margin: int
    pan_amp: np.ndarray
    pan_w: np.ndarray
    pan_phase: np.ndarray
    objects: list  # index = instance id within the video
    z_order: list  # object indices, bottom first
    light: np.ndarray  # unit vector of the shading gradient
    noise_sigma: float
    noise_key: tuple  # (seed, stream, video index) -> per-frame noise stream
    _grid: tuple = field(default=None, repr=False)
    _noise: np.ndarray = field(default=None, repr=False)

    def render(self, u: int):
        """Frame at underlying time u: (BGR uint8 image, {instance: visible bool mask})."""
        h, w, m = self.height, self.width, self.margin
        off = np.rint(m + self.pan_amp * np.sin(self.pan_w * u + self.pan_phase)).astype(int)
        image = self.background[off[1]:off[1] + h, off[0]:off[0] + w].copy()
        label = np.zeros((h, w), np.int16)
        if self._grid is None:
            self._grid = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        gx, gy = self._grid
        drawn = set()
        for k in self.z_order:
            obj = self.objects[k]
            centre, radius, angle = obj.state(u)
            reach = radius * _EXTENT + 2
            x0, y0 = int(max(0, math.floor(centre[0] - reach))), int(max(0, math.floor(centre[1] - reach)))
            x1, y1 = int(min(w, math.ceil(centre[0] + reach) + 1)), int(min(h, math.ceil(centre[1] + reach) + 1))
            if x1 <= x0 or y1 <= y0:
                continue  # outside the frame
            c, s = math.cos(angle), math.sin(angle)
            rot = np.array([[c, -s], [s, c]]) * radius
            outer, hole, kind, _ = _CLASSES[obj.cls]
            canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
            origin = np.array([x0, y0])
            pts = np.rint((outer @ rot.T + centre - origin) * 16).astype(np.int32)
            cv2.fillPoly(canvas, [pts], 1, cv2.LINE_8, 4)
            if hole is not None:
                pts = np.rint((hole @ rot.T + centre - origin) * 16).astype(np.int32)
                cv2.fillPoly(canvas, [pts], 0, cv2.LINE_8, 4)
            inside = canvas.astype(bool)
            if not inside.any():
                continue
            dx = gx[y0:y1, x0:x1] - np.float32(centre[0])
            dy = gy[y0:y1, x0:x1] - np.float32(centre[1])
            lx = (c * dx + s * dy) / radius  # object frame (inverse rotation), radius units
            ly = (-s * dx + c * dy) / radius
            t = _texture(kind, lx, ly, obj.tex_phase)[..., None]
            shade = 1.0 + 0.16 * np.clip((self.light[0] * dx + self.light[1] * dy) / radius, -1.2, 1.2)
            colour = (obj.main * (1.0 - t) + obj.second * t) * shade[..., None]
            image[y0:y1, x0:x1][inside] = colour[inside]
            label[y0:y1, x0:x1][inside] = k + 1
            drawn.add(k)
        # per-frame sensor noise: a random crop of one of a few pre-drawn noise fields (cheap),
        # chosen by a generator keyed by u so that frames do not depend on the frame count/stride
        rng = np.random.default_rng([*self.noise_key, int(u)])
        if self._noise is None:
            bank = np.random.default_rng([*self.noise_key, 1 << 40])
            self._noise = bank.standard_normal((_NOISE_FIELDS, h + _NOISE_PAD, w + _NOISE_PAD, 3),
                                               dtype=np.float32) * np.float32(self.noise_sigma)
        f, oy, ox = (int(i) for i in rng.integers(0, [_NOISE_FIELDS, _NOISE_PAD, _NOISE_PAD]))
        gain = np.float32(1.0 + 0.02 * rng.standard_normal())
        image *= gain
        image += self._noise[f, oy:oy + h, ox:ox + w]
        image = np.clip(image, 0, 255, out=image).astype(np.uint8)
        masks = {}
        for k in sorted(drawn):
            mask = label == k + 1
            if mask.any():
                masks[k] = mask
        return image, masks


def _background(rng, height: int, width: int, margin: int) -> np.ndarray:
    """Muted gradient + smooth colour noise + mottling + unannotated distractors, float32 BGR."""
    hb, wb = height + 2 * margin, width + 2 * margin
    hue = rng.uniform(0, 360)
    ca = _bgr(hue, rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.75))
    cb = _bgr(hue + rng.uniform(-90, 90), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.8))
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:hb, 0:wb].astype(np.float32)
    ramp = (xx * math.cos(a) + yy * math.sin(a))
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    bg = ca * (1 - ramp[..., None]) + cb * ramp[..., None]
    coarse = rng.standard_normal((int(rng.integers(3, 7)), int(rng.integers(4, 10)), 3)).astype(np.float32)
    bg += cv2.resize(coarse, (wb, hb), interpolation=cv2.INTER_CUBIC) * rng.uniform(10, 24)
    fine = rng.standard_normal((max(2, hb // 6), max(2, wb // 6), 3)).astype(np.float32)
    bg += cv2.resize(fine, (wb, hb), interpolation=cv2.INTER_LINEAR) * rng.uniform(3, 8)
    size = min(height, width)
    layer, alpha = np.zeros_like(bg), np.zeros((hb, wb), np.float32)
    for _ in range(int(rng.integers(3, 9))):  # distractor blobs: ellipses and irregular polygons
        colour = _bgr(rng.uniform(0, 360), rng.uniform(0.15, 0.8), rng.uniform(0.25, 0.9))
        opacity = float(rng.uniform(0.45, 0.9))
        cx, cy = rng.uniform(0, wb), rng.uniform(0, hb)
        shape = np.zeros((hb, wb), np.uint8)
        if rng.random() < 0.6:
            axes = (int(rng.uniform(0.04, 0.16) * size), int(rng.uniform(0.03, 0.12) * size))
            cv2.ellipse(shape, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            n = int(rng.integers(5, 9))
            ang = np.sort(rng.uniform(0, 2 * math.pi, n))
            rad = rng.uniform(0.03, 0.13, n) * size
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).astype(np.int32)
            cv2.fillPoly(shape, [pts], 1)
        sel = shape.astype(bool)
        layer[sel] = colour
        alpha[sel] = opacity
    for _ in range(int(rng.integers(0, 4))):  # a few thin lines
        colour = _bgr(rng.uniform(0, 360), rng.uniform(0.0, 0.5), rng.uniform(0.2, 0.9))
        p, q = rng.uniform(0, [wb, hb], 2).astype(int), rng.uniform(0, [wb, hb], 2).astype(int)
        shape = np.zeros((hb, wb), np.uint8)
        cv2.line(shape, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), 1, int(rng.integers(1, 4)))
        sel = shape.astype(bool)
        layer[sel] = colour
        alpha[sel] = 0.6
    premultiplied = cv2.GaussianBlur(layer * alpha[..., None], (0, 0), 1.2)  # soft edges
    alpha = cv2.GaussianBlur(alpha, (0, 0), 1.2)
    bg = bg * (1 - alpha[..., None]) + premultiplied
    bg = cv2.GaussianBlur(bg, (0, 0), 0.6)
    return np.clip(bg, 0, 255).astype(np.float32)


def _new_object(rng, cls: int, size: float) -> _Object:
    """Shape, scale, rotation and colours of one instance (motion filled in by the caller)."""
    main, second = _class_colours(rng, cls)
    rotating = rng.random() < 0.6
    return _Object(
        cls=cls, r0=float(rng.uniform(0.075, 0.165) * size),
        scale_amp=float(rng.uniform(0.0, 0.32)), scale_w=0.0, scale_phase=float(rng.uniform(0, 2 * math.pi)),
        rot0=float(rng.uniform(0, 2 * math.pi)),
        rot_w=float(rng.uniform(-0.06, 0.06)) if rotating else 0.0,
        p0=np.zeros(2), u0=0.0, v=np.zeros(2), wob_amp=np.zeros(2), wob_w=0.0, wob_phase=np.zeros(2),
        main=main, second=second, tex_phase=float(rng.uniform(0, 2 * math.pi)))


def _direction(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)])


def _scene_common(rng, height, width, key):
    margin = max(4, int(0.08 * min(height, width)))
    panning = rng.random() < 0.7
    return dict(
        height=height, width=width, background=_background(rng, height, width, margin), margin=margin,
        pan_amp=rng.uniform(0.2, 0.9, 2) * margin * panning, pan_w=rng.uniform(0.004, 0.03, 2),
        pan_phase=rng.uniform(0, 2 * math.pi, 2), light=_direction(rng.uniform(0, 2 * math.pi)).astype(np.float32),
        noise_sigma=float(rng.uniform(2.0, 5.0)), noise_key=key)


def _clip_scene(rng, key, length: int, height: int, width: int, min_objects: int, max_objects: int):
    """A short clip (length = underlying frames): bouncing, crossing and same-class pairs."""
    common = _scene_common(rng, height, width, key)
    size = float(min(height, width))
    unit = size / 192.0  # speeds are tuned at 192 px
    n = int(rng.integers(min_objects, max_objects + 1))
    classes = rng.integers(0, len(_CLASSES), n)
    pair = n >= 2 and rng.random() < 0.4
    if pair:
        classes[1] = classes[0]
    objects = []
    for k in range(n):
        obj = _new_object(rng, int(classes[k]), size)
        obj.scale_w = float(rng.uniform(0.5, 2.5) / max(length, 1))  # smooth growth/shrink in a clip
        if pair and k < 2:  # the same-class pair crosses at (P, u_c)
            if k == 0:
                meet = rng.uniform([0.25 * width, 0.25 * height], [0.75 * width, 0.75 * height])
                u_c = rng.uniform(0.3, 0.7) * (length - 1)
                heading = rng.uniform(0, 2 * math.pi)
            else:
                obj.r0 = objects[0].r0 * float(rng.uniform(0.8, 1.25))
                heading = heading + rng.choice([-1, 1]) * rng.uniform(math.pi / 3, math.pi)
            obj.p0, obj.u0 = meet.copy(), float(u_c)
            obj.v = _direction(heading) * rng.uniform(1.5, 5.0) * unit
            obj.wob_amp = rng.uniform(0, 0.25, 2) * obj.r0
            obj.wob_w = float(rng.uniform(0.05, 0.2))
            obj.wob_phase = np.full(2, -obj.wob_w * u_c)  # wobble is 0 at the meeting time
        elif rng.random() < 0.45:  # crossing: visible around (P, u_c), may enter and/or leave
            obj.p0 = rng.uniform([0, 0], [width, height])
            obj.u0 = float(rng.uniform(0, max(length - 1, 0)))
            obj.v = _direction(rng.uniform(0, 2 * math.pi)) * rng.uniform(2.5, 11.0) * unit
            obj.wob_amp = rng.uniform(0, 0.3, 2) * obj.r0
            obj.wob_w = float(rng.uniform(0.05, 0.25))
            obj.wob_phase = rng.uniform(0, 2 * math.pi, 2)
        else:  # bouncing inside the frame (up to ~70% out at the borders)
            speed = rng.choice([rng.uniform(0.2, 1.5), rng.uniform(1.5, 4.5), rng.uniform(5.0, 12.0)],
                               p=[0.35, 0.45, 0.2])
            obj.fold_lo = np.full(2, 0.3 * obj.r0)
            obj.fold_hi = np.array([width, height]) - 0.3 * obj.r0
            obj.p0 = rng.uniform(obj.fold_lo, obj.fold_hi)
            obj.v = _direction(rng.uniform(0, 2 * math.pi)) * speed * unit
            obj.wob_amp = rng.uniform(0, 0.6, 2) * obj.r0
            obj.wob_w = float(rng.uniform(0.05, 0.3))
            obj.wob_phase = rng.uniform(0, 2 * math.pi, 2)
        objects.append(obj)
    z_order = [int(i) for i in rng.permutation(n)]
    return _Scene(objects=objects, z_order=z_order, **common)


def _long_scene(rng, key, length: int, height: int, width: int, min_objects: int, max_objects: int):
    """A long video: objects that stay in view all along, plus now and then one crossing."""
    common = _scene_common(rng, height, width, key)
    size = float(min(height, width))
    unit = size / 192.0
    n = int(rng.integers(max(1, min_objects), max_objects + 1))
    classes = rng.integers(0, len(_CLASSES), n)
    if n >= 2 and rng.random() < 0.5:
        classes[1] = classes[0]
    objects = []
    for k in range(n):
        obj = _new_object(rng, int(classes[k]), size)
        obj.r0 = min(obj.r0, 0.13 * size)
        obj.scale_amp = min(obj.scale_amp, 0.25)
        obj.scale_w = float(rng.uniform(0.004, 0.02))
        obj.rot_w *= 0.5
        reach = obj.max_radius() * _EXTENT
        obj.fold_lo = np.full(2, reach)
        obj.fold_hi = np.maximum(np.array([width, height]) - reach, reach + 1)
        obj.p0 = rng.uniform(obj.fold_lo, obj.fold_hi)
        obj.v = _direction(rng.uniform(0, 2 * math.pi)) * rng.uniform(0.5, 3.0) * unit
        obj.wob_amp = rng.uniform(0, 0.4, 2) * obj.r0
        obj.wob_w = float(rng.uniform(0.02, 0.1))
        obj.wob_phase = rng.uniform(0, 2 * math.pi, 2)
        objects.append(obj)
    u = float(rng.exponential(250.0))
    while u < length:  # visitors: enter at an edge at time u, cross, leave
        obj = _new_object(rng, int(rng.integers(0, len(_CLASSES))), size)
        obj.scale_w = float(rng.uniform(0.004, 0.02))
        reach = obj.max_radius() * _EXTENT + 2
        target = rng.uniform([0.2 * width, 0.2 * height], [0.8 * width, 0.8 * height])
        edge = int(rng.integers(0, 4))
        along = rng.uniform(0, 1)
        entry = [np.array([-reach, along * height]), np.array([width + reach, along * height]),
                 np.array([along * width, -reach]), np.array([along * width, height + reach])][edge]
        speed = rng.uniform(1.5, 5.0) * unit
        obj.v = (target - entry) / np.linalg.norm(target - entry) * speed
        obj.p0, obj.u0 = target, u + float(np.linalg.norm(target - entry) / speed)
        objects.append(obj)
        u += float(rng.exponential(250.0)) + 20.0
    z_order = [int(i) for i in rng.permutation(len(objects))]
    return _Scene(objects=objects, z_order=z_order, **common)


# ----------------------------------------------------------------------------------------------
# Streaming API

@dataclass
class SynthFrame:
    index: int  # frame index in the video (0-based)
    u: int  # underlying time (index * stride): the number in the file name
    file_name: str  # "<video>/<u:05d>.jpg"
    image: np.ndarray  # (H, W, 3) uint8 BGR
    masks: dict  # instance id -> (H, W) bool VISIBLE mask, only instances visible in this frame
    categories: dict  # instance id -> category id, every instance of the video


def _check(frames, height, width, seed, stride, min_objects, max_objects):
    if int(frames) < 1:
        raise UserError(f"--frames must be >= 1 (got {frames})")
    if int(height) < 32 or int(width) < 32:
        raise UserError(f"--height/--width must be >= 32 (got {height}x{width})")
    if int(seed) < 0:
        raise UserError(f"--seed must be >= 0 (got {seed})")
    if int(stride) < 1:
        raise UserError(f"--stride must be >= 1 (got {stride})")
    if not 1 <= int(max_objects) <= 32:
        raise UserError(f"--max-objects must be in 1..32 (got {max_objects})")
    if not 1 <= int(min_objects) <= int(max_objects):
        raise UserError(f"--min-objects must be in 1..max-objects (got {min_objects})")


def _makedirs(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create folder {folder} ({e.strerror or e})") from None


def video_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


def iter_video_frames(frames=3000, height=192, width=320, seed=0, stride=1, max_objects=4,
                      min_objects=1, long_term=True, split="train", video_index=0, name=None):
    """Yield the frames of one synthetic video one at a time (constant memory).

    long_term=True: the long-video mode (objects stay in view, occasional visitors; stream 2).
    long_term=False: video `video_index` of `split`, exactly the clip `generate` writes.
    Instance ids are 0-based scene indices; `SynthFrame.categories` maps every one to its class.
    """
    _check(frames, height, width, seed, stride, min_objects, max_objects)
    if not long_term and split not in ("train", "valid"):
        raise UserError(f"unknown split {split!r} (train or valid)")
    stream = STREAMS["video"] if long_term else STREAMS[split]
    key = (int(seed), stream, int(video_index))
    rng = np.random.default_rng(list(key))
    length = int(frames) * int(stride)
    make = _long_scene if long_term else _clip_scene
    scene = make(rng, key, length, int(height), int(width), int(min_objects), int(max_objects))
    categories = {k: o.cls + 1 for k, o in enumerate(scene.objects)}
    name = name or (f"video_{video_index:05d}" if long_term else video_name(split, video_index))
    digits = max(5, len(str(length)))
    for t in range(int(frames)):
        u = t * int(stride)
        image, masks = scene.render(u)
        yield SynthFrame(t, u, f"{name}/{u:0{digits}d}.jpg", image, masks, categories)


class _TrackBuilder:
    """Accumulates per-instance RLEs frame by frame; emits YouTube-VIS annotations."""

    def __init__(self):
        self.tracks = {}  # instance -> [category, segs, areas, bboxes]
        self.frames = 0

    def add(self, frame: SynthFrame):
        for k, cat in frame.categories.items():
            if k not in self.tracks:
                self.tracks[k] = [cat, [None] * self.frames, [None] * self.frames, [None] * self.frames]
        for k, (cat, segs, areas, boxes) in self.tracks.items():
            mask = frame.masks.get(k)
            if mask is None:
                segs.append(None), areas.append(None), boxes.append(None)
                continue
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            areas.append(float(mask_utils.area(rle)))
            boxes.append([float(b) for b in mask_utils.toBbox(rle)])
            segs.append({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})
        self.frames += 1

    def annotations(self):
        """[{category_id, iscrowd, segmentations, areas, bboxes}] of instances seen at least once."""
        out = []
        for k in sorted(self.tracks):
            cat, segs, areas, boxes = self.tracks[k]
            if any(a is not None for a in areas):
                out.append({"category_id": int(cat), "iscrowd": 0, "segmentations": segs,
                            "areas": areas, "bboxes": boxes})
        return out


# ----------------------------------------------------------------------------------------------
# Datasets of short clips

def _render_clip(task):
    """Worker: render video `index` of a split, write its JPEGs, return (video, annotations)."""
    image_root, split, seed, index, frames, height, width, stride, min_objects, max_objects = task
    name = video_name(split, index)
    folder = os.path.join(image_root, name)
    _makedirs(folder)
    builder, file_names = _TrackBuilder(), []
    for frame in iter_video_frames(frames, height, width, seed, stride, max_objects, min_objects,
                                   long_term=False, split=split, video_index=index):
        ok, data = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise UserError(f"could not encode {frame.file_name} as JPEG")
        with open(os.path.join(image_root, frame.file_name), "wb") as f:
            f.write(data.tobytes())
        builder.add(frame)
        file_names.append(frame.file_name)
    video = {"width": int(width), "height": int(height), "length": len(file_names), "file_names": file_names}
    return video, builder.annotations()


def _worker_init():
    cv2.setNumThreads(1)


def write_json(path: str, data) -> None:
    """Write JSON atomically (temp file in the same folder + os.replace), compact and sorted-stable."""
    folder = os.path.dirname(os.path.abspath(path))
    _makedirs(folder)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, separators=(",", ":"))
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _dataset_json(videos, annotations, info):
    out_videos, out_anns = [], []
    for vid, (video, anns) in enumerate(zip(videos, annotations), start=1):
        out_videos.append({"id": vid, **video})
        for ann in anns:
            out_anns.append({"id": len(out_anns) + 1, "video_id": vid, **ann})
    return {"info": info, "licenses": [], "videos": out_videos, "annotations": out_anns,
            "categories": [dict(c) for c in CATEGORIES]}


def _write_split(out_dir, split, count, frames, height, width, seed, stride, min_objects,
                 max_objects, pool, progress):
    from tqdm import tqdm

    split_dir = os.path.join(out_dir, split)
    image_root = os.path.join(split_dir, "JPEGImages")
    _makedirs(image_root)
    tasks = [(image_root, split, seed, i, frames, height, width, stride, min_objects, max_objects)
             for i in range(count)]
    results = pool.imap(_render_clip, tasks) if pool is not None else map(_render_clip, tasks)
    videos, annotations = [], []
    for video, anns in tqdm(results, total=count, desc=f"synth {split}", unit="video",
                            disable=not progress):
        videos.append(video)
        annotations.append(anns)
    info = {"description": f"efficientvis synthetic YouTube-VIS ({split})", "split": split,
            "seed": int(seed), "stride": int(stride), "generator_version": GENERATOR_VERSION}
    path = os.path.join(split_dir, "annotations.json")
    write_json(path, _dataset_json(videos, annotations, info))
    return path


def generate(out_dir, videos, frames=36, height=192, width=320, seed=0, stride=1, max_objects=4,
             workers=None, *, min_objects=1, valid_videos=0, progress=False, preview=None):
    """Write a synthetic YouTube-VIS dataset under out_dir; return the path of train/annotations.json.

    out_dir/train/{JPEGImages/<video>/<u:05d>.jpg, annotations.json} with `videos` videos, and, when
    valid_videos > 0, out_dir/valid/... drawn from a disjoint seed stream. `preview`: optional PNG
    path of a contact sheet of the train split (the valid split when videos == 0).
    Existing files are overwritten; files of an earlier, larger run are not deleted (the JSON is
    the source of truth). workers > 1 uses a 'spawn' process pool: call it from code under
    `if __name__ == "__main__":` when running a script.
    """
    _check(frames, height, width, seed, stride, min_objects, max_objects)
    if int(videos) < 0 or int(valid_videos) < 0:
        raise UserError("--videos and --valid-videos must be >= 0")
    workers = int(workers) if workers else (os.cpu_count() or 1)
    if workers < 1:
        raise UserError(f"--workers must be >= 1 (got {workers})")
    workers = min(workers, max(int(videos), int(valid_videos), 1))
    args = (int(frames), int(height), int(width), int(seed), int(stride), int(min_objects), int(max_objects))
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init)
    try:
        # a split with no videos is not written, so a valid split can be added to an existing root
        train = _write_split(out_dir, "train", int(videos), *args, pool, progress) if int(videos) else None
        valid = None
        if valid_videos:
            valid = _write_split(out_dir, "valid", int(valid_videos), *args, pool, progress)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if preview:
        from efficientvis.ytvis.preview import contact_sheet

        source = train if videos or not valid else valid
        contact_sheet(source, preview, image_root=os.path.join(os.path.dirname(source), "JPEGImages"))
    return train or valid


# ----------------------------------------------------------------------------------------------
# One long video (mp4 + annotations), streamed

def write_video(path, frames=3000, height=192, width=320, seed=0, stride=1, max_objects=4,
                min_objects=1, fps=30.0, progress=False, preview=None):
    """Render one long video to `path` (mp4v) frame by frame; write `<path stem>.json` next to it.

    The JSON is a YouTube-VIS dataset of one video (id 1) whose `file_names` are
    `<stem>/<u:05d>.jpg`: names for the mp4's frames in order; those JPEGs are not written.
    Returns the path of the JSON.
    """
    from tqdm import tqdm

    _check(frames, height, width, seed, stride, min_objects, max_objects)
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    _makedirs(folder)
    stem, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(folder, f".{stem}.{os.getpid()}.tmp{ext}")
    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (int(width), int(height)))
    if not writer.isOpened():
        writer.release()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write video {path}: OpenCV's VideoWriter (fourcc mp4v) did not open; "
                        f"use a .mp4 path and an OpenCV build with FFmpeg")
    builder, file_names = _TrackBuilder(), []
    try:
        for frame in tqdm(iter_video_frames(frames, height, width, seed, stride, max_objects,
                                            min_objects, long_term=True, name=stem),
                          total=int(frames), desc="synth video", unit="frame", disable=not progress):
            writer.write(frame.image)
            builder.add(frame)
            file_names.append(frame.file_name)
        writer.release()
        os.replace(tmp, path)
    finally:
        writer.release()
        if os.path.exists(tmp):
            os.remove(tmp)
    video = {"width": int(width), "height": int(height), "length": len(file_names), "file_names": file_names}
    info = {"description": "efficientvis synthetic long video", "video_file": os.path.basename(path),
            "note": "file_names name the frames of video_file in order; no JPEGs are written",
            "seed": int(seed), "stride": int(stride), "fps": float(fps),
            "generator_version": GENERATOR_VERSION}
    json_path = os.path.join(folder, stem + ".json")
    write_json(json_path, _dataset_json([video], [builder.annotations()], info))
    if preview:
        from efficientvis.ytvis.preview import contact_sheet

        contact_sheet(json_path, preview, video_file=path)
    return json_path


# ----------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser):
    parser.add_argument("--out", help="output folder: OUT/train/{JPEGImages,annotations.json} "
                        "(+ OUT/valid with --valid-videos)")
    parser.add_argument("--video", metavar="PATH.mp4", help="instead of --out: write ONE long video "
                        "(mp4v) and PATH.json next to it (file_names name the mp4's frames; no JPEGs)")
    parser.add_argument("--videos", type=int, default=100, help="train videos (default 100)")
    parser.add_argument("--valid-videos", type=int, default=0,
                        help="valid videos from a disjoint seed stream (default 0: no valid split)")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per video (default 36; 3000 with --video)")
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stride", type=int, default=1, help="render every k-th frame of a k times "
                        "longer video (low frame rate: objects move k times further per frame)")
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--min-objects", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    parser.add_argument("--fps", type=float, default=30.0, help="frame rate stored in the mp4 (--video)")
    parser.add_argument("--preview", metavar="PNG", help="also write a contact sheet with mask overlays")


def run(args) -> int:
    start = time.perf_counter()
    if args.video:
        if args.out:
            raise UserError("give either --out (dataset of clips) or --video (one long video), not both")
        frames = args.frames if args.frames is not None else 3000
        path = write_video(args.video, frames, args.height, args.width, args.seed, args.stride,
                           args.max_objects, args.min_objects, args.fps, progress=True,
                           preview=args.preview)
        print(f"wrote {args.video} ({frames} frames) and {path} in {time.perf_counter() - start:.1f} s")
    elif args.out:
        frames = args.frames if args.frames is not None else 36
        path = generate(args.out, args.videos, frames, args.height, args.width, args.seed, args.stride,
                        args.max_objects, args.workers, min_objects=args.min_objects,
                        valid_videos=args.valid_videos, progress=True, preview=args.preview)
        if args.videos:
            print(f"wrote {args.videos} train videos x {frames} frames: {path}")
        if args.valid_videos:
            print(f"wrote {args.valid_videos} valid videos: "
                  f"{os.path.join(args.out, 'valid', 'annotations.json')}")
        print(f"done in {time.perf_counter() - start:.1f} s")
    else:
        raise UserError("give --out DIR (dataset of clips) or --video PATH.mp4 (one long video)")
    if args.preview:
        print(f"preview: {args.preview}")
    return 0
