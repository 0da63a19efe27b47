"""Procedural chest radiographs (PA view) with exact structure masks.

The phantom is built in two steps:

1. :func:`_sample_anatomy` draws a random but plausible anatomy from the seed:
   smooth closed or open curves (Catmull-Rom splines through jittered control
   points) in *normalised* coordinates: x = 0 at the image's left edge and 1 at
   its right edge, y = 0 at the top and 1 at the bottom. The patient's right is
   on the image's left (x < midline), as on a PA film.
2. :func:`render_phantom` rasterises those curves with PIL (masks exactly, the
   image as additive density layers), then adds blur, noise and a smooth
   exposure gradient.

Masks follow the SCR conventions: the lung masks exclude the heart; the heart
is its own blob; the clavicle masks cover the part of each clavicle that lies
over the lung field (so they overlap the lung masks, multi-label).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from medseg.structures import SCR_STRUCTURES

# Reference size the pixel-valued constants (blur, line widths) were tuned for.
_REFERENCE_SIZE = 512
# Smooth, low-frequency layers are computed at 1/_LOWRES_FACTOR resolution:
# they carry no detail, and it keeps a 512x512 render well under 0.1 s.
_LOWRES_FACTOR = 4
# Largest anisotropy (width / height scale ratio) applied to the anatomy on a
# non-square image; beyond it the anatomy keeps this aspect and is centred.
_MAX_ANISOTROPY = 1.2

Points = np.ndarray  # float (N, 2): (x, y) in normalised anatomy coordinates


# ---------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------


def _catmull_rom(points: Points, samples_per_segment: int = 12, closed: bool = False) -> Points:
    """Uniform Catmull-Rom spline through ``points`` (N, 2).

    Returns (M, 2) samples; an open curve starts and ends exactly at the first
    and last control points.
    """
    p = np.asarray(points, dtype=np.float64)
    if closed:
        padded = np.concatenate([p[-1:], p, p[:2]])
        n_segments = len(p)
    else:
        # Reflected end points give a natural tangent at both ends.
        padded = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
        n_segments = len(p) - 1
    t = np.linspace(0.0, 1.0, samples_per_segment, endpoint=False)[:, None]
    t2, t3 = t * t, t * t * t
    pieces = []
    for i in range(n_segments):
        p0, p1, p2, p3 = padded[i], padded[i + 1], padded[i + 2], padded[i + 3]
        pieces.append(
            0.5
            * (
                2 * p1
                + (p2 - p0) * t
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                + (3 * p1 - p0 - 3 * p2 + p3) * t3
            )
        )
    if not closed:
        pieces.append(p[-1:])
    return np.concatenate(pieces)


def _ellipse(center: tuple[float, float], radii: tuple[float, float], angle: float = 0.0,
             exponent: float = 2.0, n: int = 48) -> Points:
    """Closed superellipse outline (n, 2); ``angle`` in radians, exponent 2 = ellipse."""
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    x = radii[0] * np.sign(c) * np.abs(c) ** (2.0 / exponent)
    y = radii[1] * np.sign(s) * np.abs(s) ** (2.0 / exponent)
    ca, sa = np.cos(angle), np.sin(angle)
    return np.stack([center[0] + ca * x - sa * y, center[1] + sa * x + ca * y], axis=1)


def _ribbon(centerline: Points, half_widths: np.ndarray) -> Points:
    """Closed outline (2N, 2) of a band of varying half width around a curve (N, 2)."""
    d = np.gradient(centerline, axis=0)
    d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-12
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1) * np.asarray(half_widths)[:, None]
    return np.concatenate([centerline + normal, (centerline - normal)[::-1]])


# ---------------------------------------------------------------------------
# Anatomy (normalised coordinates)
# ---------------------------------------------------------------------------


@dataclass
class _Anatomy:
    """One phantom's geometry; every curve is (N, 2) normalised (x, y)."""

    body: Points  # skin outline (neck, shoulders, flanks), extends past the frame
    lungs: dict[str, Points]  # "right_lung"/"left_lung" fields incl. the part behind the heart
    heart: Points
    clavicles: dict[str, Points]  # full bone outlines
    clavicle_axes: list[Points]  # their centrelines
    trachea: Points  # with the main bronchi
    stomach_bubble: Points | None
    posterior_ribs: list[Points]  # centrelines
    anterior_ribs: list[Points]
    rib_width: float
    vertebrae: list[Points]
    pedicles: list[Points]
    spine_x: float
    spine_half_width: float
    shoulder_girdle: list[Points]  # scapulae and shoulder muscles, rendered very smooth
    vessels: list[tuple[Points, float, float]]  # (polyline, width, relative density)
    hila: list[Points]


def _lung_outline(rng: np.random.Generator, cx: float, side: int, apex_y: float,
                  lateral: float, dome_y: float, medial: float, is_left: bool) -> Points:
    """Closed outline of one lung field including the region behind the heart.

    ``side`` is -1 for the image's left (patient's right lung), +1 for the
    image's right. ``lateral``/``medial`` are distances from the midline,
    ``apex_y``/``dome_y`` the top of the apex and of the diaphragm dome.
    """
    def j(scale: float) -> float:  # small jitter of a control point
        return float(rng.uniform(-scale, scale))

    height = dome_y - apex_y
    cp_y = dome_y + rng.uniform(0.07, 0.12)  # costophrenic angle sits below the dome
    apex_d = medial + (lateral - medial) * rng.uniform(0.40, 0.52)
    # Medial border: mediastinum; on the patient's left, the aortic knob bulges in.
    knob = rng.uniform(0.025, 0.045) if is_left else 0.0
    border = [
        (medial + rng.uniform(0.0, 0.02), dome_y + rng.uniform(0.02, 0.05)),  # cardiophrenic
        (medial + j(0.006), apex_y + 0.62 * height),
        (medial + 0.5 * knob + j(0.006), apex_y + 0.42 * height),
        (medial + knob + j(0.005), apex_y + 0.30 * height),
        (medial + 0.01 + j(0.004), apex_y + 0.16 * height),
        (apex_d - 0.065, apex_y + 0.045),
        (apex_d, apex_y),
        (apex_d + 0.065 + j(0.01), apex_y + 0.04),
        (lateral * rng.uniform(0.78, 0.84), apex_y + 0.20 * height),
        (lateral * rng.uniform(0.93, 0.96), apex_y + 0.45 * height),
        (lateral, apex_y + 0.78 * height),
        (lateral * rng.uniform(0.95, 0.99), cp_y),  # costophrenic angle
    ]
    dome_d = medial + (lateral - medial) * rng.uniform(0.40, 0.55)
    diaphragm = [
        border[-1],
        (lateral * 0.86, dome_y + 0.45 * (cp_y - dome_y)),
        (dome_d, dome_y),
        ((dome_d + border[0][0]) / 2, dome_y + 0.25 * (border[0][1] - dome_y)),
        border[0],
    ]
    curve = np.concatenate([_catmull_rom(np.array(border)), _catmull_rom(np.array(diaphragm))[1:-1]])
    curve[:, 0] = cx + side * curve[:, 0]
    return curve


def _heart_outline(rng: np.random.Generator, cx: float, top_y: float, bottom_y: float,
                   right_r: float, left_r: float) -> Points:
    """Closed heart silhouette: right atrium border on the image's left,
    left ventricle bulging to the image's right, apex at the lower right."""
    h = bottom_y - top_y
    pts = np.array([
        (cx + 0.05 * left_r, top_y),
        (cx + 0.40 * left_r, top_y + 0.08 * h),  # pulmonary trunk / left atrial appendage
        (cx + 0.62 * left_r, top_y + 0.32 * h),
        (cx + 0.88 * left_r, top_y + 0.62 * h),  # left ventricle
        (cx + left_r, bottom_y - 0.12 * h),  # apex, broad on the diaphragm
        (cx + 0.55 * left_r, bottom_y + 0.02 * h),
        (cx - 0.5 * right_r, bottom_y),
        (cx - 0.98 * right_r, top_y + 0.78 * h),  # right atrium
        (cx - 0.85 * right_r, top_y + 0.38 * h),
        (cx - 0.45 * right_r, top_y + 0.06 * h),
    ])
    pts[:, 1] += rng.uniform(-0.008, 0.008, len(pts))
    pts[:, 0] += rng.uniform(-0.006, 0.006, len(pts))
    return _catmull_rom(pts, samples_per_segment=10, closed=True)


def _vessel_tree(rng: np.random.Generator, root: np.ndarray, direction: float, length: float,
                 width: float, depth: int, out: list[tuple[Points, float, float]]) -> None:
    """Branching pulmonary vessels from a hilum: each branch forks in two,
    shorter, thinner and fainter, until ``depth`` is exhausted.

    Appends (polyline (3, 2), width, relative density) to ``out``.
    """
    end = root + length * np.array([np.cos(direction), np.sin(direction)])
    mid = (root + end) / 2 + rng.normal(0, 0.1 * length, 2)  # a slight bend
    out.append((np.stack([root, mid, end]), width, 0.55 + 0.15 * depth))
    if depth <= 0:
        return
    spread = rng.uniform(0.3, 0.6)
    bias = rng.uniform(-0.3, 0.3)  # asymmetric forks look less like a drawing
    for sign in (-1, 1):
        _vessel_tree(rng, end, direction + sign * spread + bias * spread, length * rng.uniform(0.6, 0.85),
                     width * rng.uniform(0.6, 0.75), depth - 1, out)


def _body_outline(rng: np.random.Generator, cx: float, lateral: float, shoulder_y: float) -> Points:
    """Skin outline: neck, sloping shoulders, chest wall and flanks. It runs
    far past the frame so tall or wide images never see its ends."""
    bw = lateral + rng.uniform(0.05, 0.10)  # half width at the chest
    neck = rng.uniform(0.10, 0.13)
    half = [
        (neck, -2.0), (neck, -0.3), (neck, shoulder_y - 0.1), (neck + 0.03, shoulder_y - 0.055),
        (neck + 0.12, shoulder_y - 0.025), (bw * 0.75, shoulder_y), (bw * 1.0, shoulder_y + 0.05),
        (bw * 1.12, shoulder_y + 0.14),
        (bw * 1.14, 0.4), (bw * 1.06, 0.62), (bw * 1.0, 0.8), (bw * 1.03, 1.0), (bw * 1.1, 1.3), (bw * 1.1, 3.0),
    ]
    right_side = np.array([(cx - x, y) for x, y in half])
    left_side = np.array([(cx + x, y) for x, y in half])[::-1]
    return np.concatenate([_catmull_rom(right_side, 8), _catmull_rom(left_side, 8)])


def _clavicles(rng: np.random.Generator, cx: float, apex_y: float) -> tuple[dict[str, Points], list[Points]]:
    """S-shaped clavicles from the sternal head (medial, low) to the acromion
    (lateral, higher), crossing the lung apices obliquely.

    Returns ({name: outline}, [centreline, ...]).
    """
    outlines, axes = {}, []
    clav_y = apex_y + rng.uniform(0.10, 0.13)
    tilt = rng.uniform(0.08, 0.11)
    for name, side in (("right_clavicle", -1), ("left_clavicle", +1)):
        y0 = clav_y + rng.uniform(-0.01, 0.01)
        d = np.array([0.03, 0.09, 0.17, 0.26, 0.34, 0.40]) * rng.uniform(0.95, 1.08)
        # Gentle S: the medial shaft rises steeply, the lateral third flattens.
        y = y0 - tilt * np.array([0.0, 0.3, 0.62, 0.85, 0.97, 1.0]) + np.array([0.0, 0.008, 0.01, 0.0, -0.01, -0.006])
        axis = _catmull_rom(np.stack([cx + side * d, y], axis=1), 8)
        t = np.linspace(0.0, 1.0, len(axis))
        # Thick sternal head, slimmer shaft, slightly flared acromial end.
        half_width = rng.uniform(0.013, 0.016) * (0.85 + 0.6 * np.exp(-t / 0.1) + 0.3 * np.exp(-(1 - t) / 0.08))
        outlines[name] = _ribbon(axis, half_width)
        axes.append(axis)
    return outlines, axes


def _trachea(rng: np.random.Generator, cx: float, carina_y: float) -> Points:
    """Air column down the midline, forking into the main bronchi at the carina."""
    tw = rng.uniform(0.014, 0.02)  # half width
    tx = cx - rng.uniform(0.0, 0.01)  # often pushed slightly right by the aortic arch
    return np.array([(tx - tw, -2.0), (tx - tw, carina_y), (tx - 3.2 * tw, carina_y + 0.05),
                     (tx - 2.2 * tw, carina_y + 0.055), (tx, carina_y + 0.01), (tx + 2.4 * tw, carina_y + 0.06),
                     (tx + 3.4 * tw, carina_y + 0.055), (tx + tw, carina_y), (tx + tw, -2.0)])


def _ribs(rng: np.random.Generator, cx: float, lateral: float, first_y: float,
          last_y: float) -> tuple[list[Points], list[Points]]:
    """Ten ribs a side. Each posterior rib arches laterally from the spine,
    turns down along the chest wall and comes back as the anterior rib, which
    runs down and medially towards the sternum (cartilage is invisible).

    Returns (posterior centrelines, anterior centrelines).
    """
    posterior, anterior = [], []
    n_ribs = 10
    growth = 0.045  # lower rib spaces are wider
    spacing = (last_y - first_y) / sum(1.0 + growth * i for i in range(n_ribs - 1))
    slope = rng.uniform(0.3, 0.5)  # anterior ribs: drop per unit of medial run
    for side in (-1, 1):
        y0 = first_y
        wall = lateral * rng.uniform(1.05, 1.1)  # inner chest wall, a little outside the lung
        for i in range(n_ribs):
            span = wall * (0.55, 0.8, 0.93)[i] if i < 3 else wall  # upper ribs are short and curved
            rise = 0.02 + 0.025 * (1.0 - i / n_ribs)  # posterior ribs arch upwards
            end_d = rng.uniform(0.08, 0.14) if i else 0.06
            post = [(0.03, y0), (0.07, y0 - 0.6 * rise), (0.35 * span, y0 - rise),
                    (0.7 * span, y0 - 0.2 * rise + 0.012), (0.93 * span, y0 + 0.04), (span, y0 + 0.075)]
            ant = [(0.96 * span, y0 + 0.11), (0.75 * span, y0 + 0.14),
                   (end_d, y0 + 0.14 + slope * (0.75 * span - end_d))]
            pts = np.array(post + ant)
            pts[:, 1] += rng.normal(0, 0.002, len(pts))
            pts[:, 0] = cx + side * pts[:, 0]
            samples = 6
            curve = _catmull_rom(pts, samples)
            turn = samples * (len(post) - 1)  # sample index of the lateral turn
            posterior.append(curve[: turn + 1])
            anterior.append(curve[turn:])
            y0 += spacing * (1.0 + growth * i)
    return posterior, anterior


def _vertebrae(cx: float, half_width: float) -> tuple[list[Points], list[Points]]:
    """Vertebral bodies (rounded boxes, taller lower down) and their pedicles,
    from above the frame to below it: tall images show more neck and abdomen.

    Returns (bodies, pedicles).
    """
    bodies, pedicles = [], []
    y = -0.6
    while y < 1.6:
        h = 0.028 + 0.018 * np.clip(y, 0, 1)
        w = half_width * (0.85 + 0.3 * np.clip(y, 0, 1))
        bodies.append(_ellipse((cx, y + h / 2), (w, h * 0.42), 0.0, 5.0, 32))
        for side in (-1, 1):
            pedicles.append(_ellipse((cx + side * half_width * 0.75, y + h * 0.4), (half_width * 0.22, h * 0.25),
                                     0.0, 2.0, 16))
        y += h
    return bodies, pedicles


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw one anatomy; all sizes are fractions of the image width/height."""
    cx = 0.5 + rng.normal(0.0, 0.012)  # midline
    lateral = rng.uniform(0.35, 0.41)  # lung half width of the thorax
    apex_y = rng.uniform(0.04, 0.10)
    dome_r = rng.uniform(0.64, 0.74)  # right hemidiaphragm is higher ...
    dome_l = dome_r + rng.uniform(0.015, 0.045)  # ... than the left
    medial_r = rng.uniform(0.035, 0.055)
    medial_l = rng.uniform(0.035, 0.055)

    lungs = {
        "right_lung": _lung_outline(rng, cx, -1, apex_y + rng.uniform(0.0, 0.015), lateral * rng.uniform(1.0, 1.04),
                                    dome_r, medial_r, is_left=False),
        "left_lung": _lung_outline(rng, cx, +1, apex_y, lateral * rng.uniform(0.96, 1.0), dome_l, medial_l,
                                   is_left=True),
    }

    # Heart: a cardiothoracic ratio of 0.38-0.52, mostly left of the midline,
    # sitting on the diaphragm.
    thoracic = 2 * lateral
    ctr = rng.uniform(0.38, 0.52)
    right_r = ctr * thoracic * rng.uniform(0.30, 0.38)
    left_r = ctr * thoracic - right_r
    heart_top = apex_y + (dome_r - apex_y) * rng.uniform(0.50, 0.58)
    heart_bottom = (dome_r + dome_l) / 2 + rng.uniform(0.02, 0.05)
    heart = _heart_outline(rng, cx + rng.uniform(-0.005, 0.015), heart_top, heart_bottom, right_r, left_r)

    shoulder_y = apex_y - rng.uniform(0.02, 0.06)
    body = _body_outline(rng, cx, lateral, shoulder_y)
    clavicles, clavicle_axes = _clavicles(rng, cx, apex_y)
    trachea = _trachea(rng, cx, carina_y=heart_top - rng.uniform(0.06, 0.1))
    stomach = None
    if rng.random() < 0.6:  # gastric air bubble under the left hemidiaphragm
        stomach = _ellipse((cx + rng.uniform(0.12, 0.2), dome_l + rng.uniform(0.045, 0.07)),
                           (rng.uniform(0.04, 0.07), rng.uniform(0.02, 0.035)), rng.uniform(-0.3, 0.3), 2.6)

    rib_width = rng.uniform(0.017, 0.022)
    posterior_ribs, anterior_ribs = _ribs(rng, cx, lateral, apex_y - rng.uniform(0.0, 0.02), max(dome_r, dome_l))
    spine_half_width = rng.uniform(0.03, 0.04)
    vertebrae, pedicles = _vertebrae(cx, spine_half_width)

    shoulder_girdle = []
    for side in (-1, 1):
        # A wedge over the upper lateral chest: scapula and shoulder muscles.
        sx = cx + side * (lateral + rng.uniform(-0.03, 0.01))
        shoulder_girdle.append(np.array([(sx + side * 0.06, shoulder_y + 0.03), (sx - side * 0.07, shoulder_y + 0.08),
                                         (sx - side * 0.02, 0.42 + rng.uniform(-0.03, 0.03)), (sx + side * 0.05, 0.3)]))

    # Hila, and vessel trees fanning out from them into each lung.
    hila: list[Points] = []
    vessels: list[tuple[Points, float, float]] = []
    for side in (-1, 1):
        hilum = np.array([cx + side * (right_r if side < 0 else left_r * 0.6) * rng.uniform(0.75, 0.95),
                          heart_top + rng.uniform(-0.05, 0.0)])
        hila.append(_ellipse((float(hilum[0]), float(hilum[1])), (0.03, 0.05), side * 0.3, 2.0, 24))
        lateral_direction = np.pi / 2 - side * np.pi / 2
        for angle in np.linspace(-1.2, 1.3, 8):  # from up-and-out to down-and-out
            direction = lateral_direction - side * angle + rng.normal(0, 0.12)
            _vessel_tree(rng, hilum, direction, rng.uniform(0.04, 0.07), rng.uniform(0.006, 0.009), 4, vessels)

    return _Anatomy(
        body=body, lungs=lungs, heart=heart, clavicles=clavicles, clavicle_axes=clavicle_axes, trachea=trachea,
        stomach_bubble=stomach, posterior_ribs=posterior_ribs, anterior_ribs=anterior_ribs, rib_width=rib_width,
        vertebrae=vertebrae, pedicles=pedicles, spine_x=cx, spine_half_width=spine_half_width,
        shoulder_girdle=shoulder_girdle, vessels=vessels, hila=hila,
    )


# ---------------------------------------------------------------------------
# Rasterisation
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """Maps normalised anatomy coordinates to pixel coordinates of one raster.

    Anatomy is scaled to the image (with bounded anisotropy), zoomed, shifted
    and rotated about the image centre.
    """

    height: int
    width: int
    sx: float  # pixels per normalised unit along x
    sy: float
    shift: tuple[float, float]  # pixels
    angle: float  # radians

    def to_px(self, points: Points) -> list[tuple[float, float]]:
        """Normalised (N, 2) points -> N (x, y) pixel tuples, as PIL draws them."""
        p = np.asarray(points, dtype=np.float64)
        x = (p[:, 0] - 0.5) * self.sx + self.shift[0]
        y = (p[:, 1] - 0.5) * self.sy + self.shift[1]
        c, s = np.cos(self.angle), np.sin(self.angle)
        px = self.width / 2 + c * x - s * y
        py = self.height / 2 + s * x + c * y
        return list(zip(px.tolist(), py.tolist()))

    def length_px(self, length: float) -> float:
        """A normalised length in pixels (geometric mean of the two axes)."""
        return length * float(np.sqrt(self.sx * self.sy))

    def scaled(self, factor: float) -> _Frame:
        """The same mapping on a raster ``factor`` times smaller."""
        h, w = max(1, round(self.height / factor)), max(1, round(self.width / factor))
        return _Frame(h, w, self.sx / factor, self.sy / factor, (self.shift[0] / factor, self.shift[1] / factor),
                      self.angle)


class _Canvas:
    """A float32 raster to draw filled shapes and thick lines on."""

    def __init__(self, frame: _Frame) -> None:
        self.frame = frame
        self.image = Image.new("F", (frame.width, frame.height), 0.0)
        self.draw = ImageDraw.Draw(self.image)

    def polygon(self, points: Points, value: float = 1.0) -> None:
        self.draw.polygon(self.frame.to_px(points), fill=float(value))

    def line(self, points: Points, width: float, value: float = 1.0) -> None:
        """Polyline of ``width`` normalised units (at least one pixel)."""
        w = max(1, round(self.frame.length_px(width)))
        self.draw.line(self.frame.to_px(points), fill=float(value), width=w)

    def lines(self, polylines: list[Points], widths: list[float], values: list[float]) -> None:
        """Many polylines at once (one coordinate transform: much faster)."""
        if not polylines:
            return
        xy = self.frame.to_px(np.concatenate(polylines))
        start = 0
        for line, width, value in zip(polylines, widths, values):
            w = max(1, round(self.frame.length_px(width)))
            self.draw.line(xy[start : start + len(line)], fill=float(value), width=w)
            start += len(line)

    def array(self) -> np.ndarray:
        """The raster as float32 (H, W)."""
        return np.asarray(self.image, dtype=np.float32)


def _mask(frame: _Frame, *polygons: Points) -> np.ndarray:
    """Boolean (H, W) union of filled polygons."""
    canvas = _Canvas(frame)
    for poly in polygons:
        canvas.polygon(poly)
    return canvas.array() > 0.5


def _smooth_lowres(frame: _Frame, polygons: list[Points], sigma: float, weights: list[float] | None = None) -> np.ndarray:
    """Heavily blurred union of polygons, (H, W) float32: computed on a coarse
    raster and upsampled, because only its low frequencies matter.

    ``sigma`` is in normalised units (fraction of the image).
    """
    low = frame.scaled(_LOWRES_FACTOR)
    canvas = _Canvas(low)
    for poly, w in zip(polygons, weights or [1.0] * len(polygons)):
        canvas.polygon(poly, w)
    blurred = ndimage.gaussian_filter(canvas.array(), low.length_px(sigma), mode="nearest")
    return _upsample(blurred, frame)


def _upsample(small: np.ndarray, frame: _Frame) -> np.ndarray:
    """Bilinear resize of a float32 raster to the frame's (H, W)."""
    return np.asarray(Image.fromarray(small).resize((frame.width, frame.height), Image.BILINEAR), dtype=np.float32)


def _bone_band(canvas: _Canvas, line: Points, width: float, value: float, marrow: float = 0.55) -> None:
    """Draw a tubular bone of total ``width`` along ``line`` (N, 2): a bright
    cortex with a dimmer medullary centre."""
    half = np.full(len(line), width / 2)
    canvas.polygon(_ribbon(line, half), value)
    canvas.polygon(_ribbon(line, half * 0.5), value * marrow)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _make_frame(rng: np.random.Generator, shape: tuple[int, int]) -> _Frame:
    """Fit the anatomy to an (H, W) image with a random zoom, shift and
    rotation (+-5 degrees), as patients are never positioned identically."""
    height, width = shape
    sx, sy = float(width), float(height)
    # Bound the anisotropy so a wide or tall frame does not squash the chest.
    if sx > _MAX_ANISOTROPY * sy:
        sx = _MAX_ANISOTROPY * sy
    if sy > _MAX_ANISOTROPY * sx:
        sy = _MAX_ANISOTROPY * sx
    zoom = rng.uniform(0.92, 1.04)
    shift = (rng.normal(0, 0.015) * sx, rng.normal(0, 0.015) * sy + 0.01 * sy)
    angle = np.deg2rad(rng.uniform(-5.0, 5.0))
    return _Frame(height, width, sx * zoom, sy * zoom, shift, angle)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected component of a bool (H, W) mask: cutting
    the heart out of a lung field can leave slivers an annotator would not draw."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _render_masks(anatomy: _Anatomy, frame: _Frame) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Exact SCR-style masks, plus the aerated lung region (bool (H, W)),
    which includes the lung behind the heart."""
    heart = _mask(frame, anatomy.heart)
    masks: dict[str, np.ndarray] = {"heart": heart}
    aerated = np.zeros_like(heart)
    # SCR clavicles cover only the part over the lung field (plus a small margin).
    margin = _Canvas(frame)
    for name, poly in anatomy.lungs.items():
        lung_field = _mask(frame, poly)
        masks[name] = _largest_component(lung_field & ~heart)
        aerated |= masks[name] | (lung_field & heart)
        margin.polygon(poly)
        margin.line(np.concatenate([poly, poly[:1]]), 0.012)
    near_lungs = margin.array() > 0.5
    for name, poly in anatomy.clavicles.items():
        masks[name] = _mask(frame, poly) & near_lungs
    return {name: masks[name] for name in SCR_STRUCTURES}, aerated


def _render_density(anatomy: _Anatomy, frame: _Frame, heart: np.ndarray, aerated: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """Projected density (H, W) float32 in display units: 0 = air outside the
    body, about 1 = abdomen; bone and soft tissue add, lung air subtracts."""
    px = frame.length_px(1.0) / _REFERENCE_SIZE  # blur widths were tuned at 512 px
    body = _mask(frame, anatomy.body).astype(np.float32)
    body_depth = _smooth_lowres(frame, [anatomy.body], 0.09)  # rounded chest: thicker centrally
    density = body * (rng.uniform(0.2, 0.3) + rng.uniform(0.5, 0.6) * body_depth)
    # Uneven soft tissue (muscle, fat, organs): very smooth random thickness.
    coarse = rng.standard_normal((max(2, frame.height // 16), max(2, frame.width // 16)), dtype=np.float32)
    density += rng.uniform(0.03, 0.06) * body * _upsample(ndimage.gaussian_filter(coarse, 1.5), frame)
    # Shoulder girdle muscles make the apices brighter than the lung bases.
    density += rng.uniform(0.08, 0.14) * _smooth_lowres(frame, anatomy.shoulder_girdle, 0.06)

    # Lung air: sharp at the borders, deepest in the middle of each lung;
    # behind the heart only part of the air thickness remains.
    lung_edge = ndimage.gaussian_filter(aerated.astype(np.float32), 0.9 * px)
    lung_depth = _smooth_lowres(frame, list(anatomy.lungs.values()), 0.04)
    # The heart border stays sharp (it is tangent to the beam); the final blur softens it.
    air = lung_edge * (0.05 + 0.95 * lung_depth**1.6) * (1.0 - rng.uniform(0.7, 0.85) * heart.astype(np.float32))
    density -= rng.uniform(0.38, 0.5) * air
    density += rng.uniform(0.03, 0.06) * _smooth_lowres(frame, [anatomy.heart], 0.03)

    # Vessels and hila: visible only against lung air.
    vessels = _Canvas(frame)
    for hilum in anatomy.hila:
        vessels.polygon(hilum, 0.6)
    segments, widths, values = zip(*anatomy.vessels) if anatomy.vessels else ((), (), ())
    vessels.lines(list(segments), list(widths), list(values))
    detail = rng.uniform(0.05, 0.08) * vessels.array() * lung_edge  # blurred with the bones below
    # Parenchyma texture: smoothed noise inside the lungs.
    texture = rng.standard_normal((max(1, frame.height // 2), max(1, frame.width // 2)), dtype=np.float32)
    texture = _upsample(ndimage.gaussian_filter(texture, 1.0) + 0.6 * ndimage.gaussian_filter(texture, 3.0), frame)
    density += rng.uniform(0.02, 0.035) * texture * lung_edge

    # Other air: trachea and main bronchi, gastric bubble.
    gas = _Canvas(frame)
    gas.polygon(anatomy.trachea, -0.1)
    if anatomy.stomach_bubble is not None:
        gas.polygon(anatomy.stomach_bubble, -0.08)
    detail += gas.array()

    # Bones. Posterior and anterior ribs on separate canvases so crossings add up.
    # Each rib a little different in width and density, as real ones are.
    posterior, anterior, spine_bones, clavicles = (_Canvas(frame) for _ in range(4))
    for rib in anatomy.posterior_ribs:
        _bone_band(posterior, rib, anatomy.rib_width * rng.uniform(0.85, 1.15), rng.uniform(0.8, 1.2), marrow=0.75)
    for rib in anatomy.anterior_ribs:
        _bone_band(anterior, rib, anatomy.rib_width * rng.uniform(1.0, 1.25), rng.uniform(0.7, 1.2), marrow=0.85)
    for vertebra in anatomy.vertebrae:
        spine_bones.polygon(vertebra, 0.2)
    for pedicle in anatomy.pedicles:
        spine_bones.polygon(pedicle, 0.35)
    for clavicle in anatomy.clavicles.values():
        clavicles.polygon(clavicle, 1.0)
    for axis in anatomy.clavicle_axes:  # medullary cavity: dimmer core
        clavicles.line(axis, 0.01, 0.75)
    ribs = rng.uniform(0.05, 0.08) * posterior.array() + rng.uniform(0.03, 0.05) * anterior.array()
    # Scatter lowers bone contrast over thick soft tissue (abdomen, mediastinum).
    contrast = 0.35 + 0.65 * _smooth_lowres(frame, list(anatomy.lungs.values()), 0.02)
    bone = (ribs + rng.uniform(0.14, 0.2) * spine_bones.array()) * contrast
    bone += rng.uniform(0.1, 0.14) * clavicles.array()
    density += ndimage.gaussian_filter(bone * body + detail, 1.2 * px)
    x, w = anatomy.spine_x, anatomy.spine_half_width  # widens slightly downwards
    spine = np.array([(x - w, -2.0), (x + w, -2.0), (x + 1.25 * w, 1.3), (x + 1.25 * w, 3.0),
                      (x - 1.25 * w, 3.0), (x - 1.25 * w, 1.3)])
    density += rng.uniform(0.05, 0.08) * _smooth_lowres(frame, [spine], 0.008)
    return density


def _film(density: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Detector/film response: a saturating curve, a smooth exposure gradient
    (heel effect, uneven thickness), blur and noise. Returns float32 in [0, 1]."""
    height, width = density.shape
    px = np.sqrt(height * width) / _REFERENCE_SIZE
    k = rng.uniform(1.0, 1.8)
    image = (1.0 - np.exp(-k * np.clip(density, 0.0, None))) / (1.0 - np.exp(-k))
    yy = (np.arange(height, dtype=np.float32) / height - 0.5)[:, None]
    xx = (np.arange(width, dtype=np.float32) / width - 0.5)[None, :]
    gx, gy, gq = rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08), rng.uniform(-0.12, 0.04)
    image = image * rng.uniform(0.85, 0.95) + rng.uniform(0.02, 0.06) + gx * xx + gy * yy + gq * (xx * xx + yy * yy)
    image = ndimage.gaussian_filter(image.astype(np.float32), rng.uniform(0.5, 0.9) * px)
    image += rng.uniform(0.006, 0.015) * rng.standard_normal((height, width), dtype=np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def render_phantom(seed: int, shape: tuple[int, int] = (512, 512)) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render one synthetic PA chest radiograph and its structure masks.

    Args:
        seed: any int; the same seed always gives the same image and masks.
        shape: (H, W) in pixels; any aspect, the anatomy scales to the image.

    Returns:
        image: float32 (H, W) in [0, 1], display polarity (MONOCHROME2: bone
            and soft tissue bright, air in the lungs and outside the body dark).
        masks: {structure: bool (H, W)} for every name in
            :data:`medseg.structures.SCR_STRUCTURES`. Lung masks exclude the
            heart; clavicle masks overlap the lung masks.
    """
    height, width = int(shape[0]), int(shape[1])
    if height < 16 or width < 16:
        raise ValueError(f"phantom shape must be at least 16x16 pixels, got {shape}")
    rng = np.random.default_rng(seed)
    anatomy = _sample_anatomy(rng)
    frame = _make_frame(rng, (height, width))
    masks, aerated = _render_masks(anatomy, frame)
    density = _render_density(anatomy, frame, masks["heart"], aerated, rng)
    return _film(density, rng), masks
