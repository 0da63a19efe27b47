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

from dataclasses import dataclass, field

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

    body: Points
    lungs: dict[str, Points]  # "right_lung"/"left_lung" outline incl. the part behind the heart
    heart: Points
    clavicles: dict[str, Points]  # full bone outlines
    trachea: Points
    stomach_bubble: Points | None
    posterior_ribs: list[Points] = field(default_factory=list)  # centerlines
    anterior_ribs: list[Points] = field(default_factory=list)
    rib_width: float = 0.02
    vertebrae: list[Points] = field(default_factory=list)
    pedicles: list[Points] = field(default_factory=list)
    spine_x: float = 0.5
    spine_half_width: float = 0.035
    scapulae: list[Points] = field(default_factory=list)
    humeri: list[Points] = field(default_factory=list)
    breasts: list[Points] = field(default_factory=list)
    vessels: list[tuple[Points, float]] = field(default_factory=list)  # (segment, width)
    hila: list[Points] = field(default_factory=list)


def _lung_outline(rng: np.random.Generator, cx: float, side: int, apex_y: float,
                  lateral: float, dome_y: float, medial: float, is_left: bool) -> Points:
    """Closed outline of one lung field including the region behind the heart.

    ``side`` is -1 for the image's left (patient's right lung), +1 for the
    image's right. ``lateral``/``medial`` are distances from the midline,
    ``apex_y``/``dome_y`` the top of the apex and of the diaphragm dome.
    """
    j = lambda scale: rng.uniform(-scale, scale)  # noqa: E731 - tiny local jitter helper
    height = dome_y - apex_y
    cp_y = dome_y + rng.uniform(0.06, 0.10)  # costophrenic angle sits below the dome
    apex_d = medial + (lateral - medial) * rng.uniform(0.28, 0.38)
    # Medial border: mediastinum; on the patient's left, the aortic knob bulges in.
    knob = rng.uniform(0.025, 0.045) if is_left else 0.0
    border = [
        (medial + rng.uniform(0.0, 0.02), dome_y + rng.uniform(0.02, 0.05)),  # cardiophrenic
        (medial + j(0.006), apex_y + 0.62 * height),
        (medial + 0.5 * knob + j(0.006), apex_y + 0.42 * height),
        (medial + knob + j(0.005), apex_y + 0.30 * height),
        (medial + 0.004 + j(0.004), apex_y + 0.17 * height),
        (apex_d - 0.045, apex_y + 0.045),
        (apex_d, apex_y),
        (apex_d + 0.06 + j(0.01), apex_y + 0.025),
        (lateral * rng.uniform(0.84, 0.90), apex_y + 0.16 * height),
        (lateral * rng.uniform(0.96, 0.99), apex_y + 0.40 * height),
        (lateral, apex_y + 0.68 * height),
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
        (cx + 0.68 * left_r, top_y + 0.35 * h),
        (cx + 0.95 * left_r, top_y + 0.68 * h),  # left ventricle
        (cx + 0.92 * left_r, bottom_y - 0.06 * h),  # apex
        (cx + 0.45 * left_r, bottom_y + 0.02 * h),
        (cx - 0.45 * right_r, bottom_y),
        (cx - 0.98 * right_r, top_y + 0.78 * h),  # right atrium
        (cx - 0.85 * right_r, top_y + 0.38 * h),
        (cx - 0.45 * right_r, top_y + 0.06 * h),
    ])
    pts[:, 1] += rng.uniform(-0.008, 0.008, len(pts))
    pts[:, 0] += rng.uniform(-0.006, 0.006, len(pts))
    return _catmull_rom(pts, samples_per_segment=10, closed=True)


def _vessel_tree(rng: np.random.Generator, root: np.ndarray, direction: float, length: float,
                 width: float, depth: int, out: list[tuple[Points, float]]) -> None:
    """Branching pulmonary vessels from a hilum: each branch forks in two,
    shorter and thinner, until ``depth`` is exhausted."""
    end = root + length * np.array([np.cos(direction), np.sin(direction)])
    mid = (root + end) / 2 + rng.normal(0, 0.08 * length, 2)  # a slight bend
    out.append((np.stack([root, mid, end]), width))
    if depth <= 0:
        return
    for sign in (-1, 1):
        _vessel_tree(rng, end, direction + sign * rng.uniform(0.25, 0.55), length * rng.uniform(0.62, 0.8),
                     width * 0.68, depth - 1, out)


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw one anatomy; all sizes are fractions of the image height/width."""
    cx = 0.5 + rng.normal(0.0, 0.012)
    lateral = rng.uniform(0.33, 0.39)  # lung half width of the thorax
    apex_y = rng.uniform(0.05, 0.11)
    dome_r = rng.uniform(0.60, 0.70)  # right hemidiaphragm is higher ...
    dome_l = dome_r + rng.uniform(0.015, 0.045)  # ... than the left
    medial_r = rng.uniform(0.035, 0.055)
    medial_l = rng.uniform(0.035, 0.055)

    lungs = {
        "right_lung": _lung_outline(rng, cx, -1, apex_y + rng.uniform(0.0, 0.015), lateral * rng.uniform(1.0, 1.04),
                                    dome_r, medial_r, is_left=False),
        "left_lung": _lung_outline(rng, cx, +1, apex_y, lateral * rng.uniform(0.96, 1.0), dome_l, medial_l,
                                   is_left=True),
    }

    # Heart: about a third to a half of the thoracic width, on the diaphragm.
    thoracic = 2 * lateral
    ctr = rng.uniform(0.38, 0.52)
    right_r = ctr * thoracic * rng.uniform(0.30, 0.38)
    left_r = ctr * thoracic - right_r
    heart_top = rng.uniform(0.37, 0.43)
    heart_bottom = (dome_r + dome_l) / 2 + rng.uniform(0.02, 0.05)
    heart = _heart_outline(rng, cx + rng.uniform(-0.005, 0.015), heart_top, heart_bottom, right_r, left_r)

    # Body: neck, sloping shoulders, chest wall and flanks (extends past the frame).
    bw = lateral + rng.uniform(0.06, 0.11)  # half width at the chest
    shoulder_y = apex_y - rng.uniform(0.0, 0.04)
    neck = rng.uniform(0.07, 0.09)
    half = [
        (neck, -0.2), (neck, shoulder_y - 0.08), (neck + 0.06, shoulder_y - 0.035),
        (bw * 0.62, shoulder_y - 0.01), (bw * 0.95, shoulder_y + 0.04), (bw * 1.12, shoulder_y + 0.14),
        (bw * 1.14, 0.4), (bw * 1.06, 0.62), (bw * 1.0, 0.8), (bw * 1.03, 1.0), (bw * 1.1, 1.3),
    ]
    right_side = np.array([(cx - x, y) for x, y in half])
    left_side = np.array([(cx + x, y) for x, y in half])[::-1]
    body = np.concatenate([_catmull_rom(right_side, 8), _catmull_rom(left_side, 8)])

    # Clavicles: S-shaped bones from the sternal head (medial, low) to the
    # acromion (lateral, higher), crossing the lung apex obliquely.
    clavicles = {}
    clav_y = apex_y + rng.uniform(0.07, 0.11)
    clav_tilt = rng.uniform(0.04, 0.08)
    for name, side in (("right_clavicle", -1), ("left_clavicle", +1)):
        y0 = clav_y + rng.uniform(-0.01, 0.01)
        d = np.array([0.035, 0.09, 0.16, 0.24, 0.31, 0.37]) * rng.uniform(0.95, 1.08)
        y = y0 - clav_tilt * np.array([0.0, 0.25, 0.5, 0.75, 0.95, 1.1]) + np.array(
            [0.0, 0.006, 0.008, 0.0, -0.008, -0.004])
        line = _catmull_rom(np.stack([cx + side * d, y], axis=1), 8)
        s = np.linspace(0.0, 1.0, len(line))
        hw = rng.uniform(0.012, 0.016) * (1.0 + 0.45 * np.exp(-s / 0.08) + 0.25 * np.exp(-(1 - s) / 0.1))
        clavicles[name] = _ribbon(line, hw)

    # Trachea: air column down the midline to the carina.
    carina_y = heart_top - rng.uniform(0.06, 0.1)
    tw = rng.uniform(0.014, 0.02)
    tx = cx - rng.uniform(0.0, 0.01)
    trachea = np.array([(tx - tw, -0.1), (tx - tw, carina_y), (tx - 3.2 * tw, carina_y + 0.05),
                        (tx - 2.2 * tw, carina_y + 0.055), (tx, carina_y + 0.01), (tx + 2.4 * tw, carina_y + 0.06),
                        (tx + 3.4 * tw, carina_y + 0.055), (tx + tw, carina_y), (tx + tw, -0.1)])

    stomach = None
    if rng.random() < 0.6:
        stomach = _ellipse((cx + rng.uniform(0.12, 0.2), dome_l + rng.uniform(0.045, 0.07)),
                           (rng.uniform(0.04, 0.07), rng.uniform(0.02, 0.035)), rng.uniform(-0.3, 0.3), 2.6)

    anatomy = _Anatomy(body=body, lungs=lungs, heart=heart, clavicles=clavicles, trachea=trachea,
                       stomach_bubble=stomach, spine_x=cx, spine_half_width=rng.uniform(0.03, 0.04))

    # Ribs: posterior ribs arch laterally from the spine, then turn into the
    # anterior ribs which run down and medially towards the sternum.
    anatomy.rib_width = rng.uniform(0.017, 0.022)
    n_ribs = 10
    first = apex_y - rng.uniform(0.0, 0.02)
    growth = 0.045  # lower rib spaces are wider
    spacing = (max(dome_r, dome_l) - first) / sum(1.0 + growth * i for i in range(n_ribs - 1))
    slope = rng.uniform(0.3, 0.5)  # anterior ribs: drop per unit of medial run
    for side in (-1, 1):
        y0 = first
        wall = lateral * rng.uniform(1.05, 1.1)  # inner chest wall, a little outside the lung
        for i in range(n_ribs):
            span = wall * (0.55, 0.8, 0.93)[i] if i < 3 else wall  # upper ribs are short and curved
            rise = 0.012 + 0.02 * (1.0 - i / n_ribs)
            end_d = rng.uniform(0.08, 0.14) if i else 0.06
            post = [(0.03, y0), (0.07, y0 - 0.6 * rise), (0.35 * span, y0 - rise),
                    (0.7 * span, y0 - 0.2 * rise + 0.012), (0.93 * span, y0 + 0.04), (span, y0 + 0.075)]
            ant = [(0.96 * span, y0 + 0.11), (0.75 * span, y0 + 0.14),
                   (end_d, y0 + 0.14 + slope * (0.75 * span - end_d))]
            pts = np.array(post + ant)
            pts[:, 1] += rng.normal(0, 0.002, len(pts))
            pts[:, 0] = cx + side * pts[:, 0]
            curve = _catmull_rom(pts, 6)
            turn = 6 * (len(post) - 1)  # sample index of the lateral turn
            anatomy.posterior_ribs.append(curve[: turn + 1])
            anatomy.anterior_ribs.append(curve[turn:])
            y0 += spacing * (1.0 + growth * i)

    # Vertebral bodies with pedicles, from the neck to the abdomen.
    sw = anatomy.spine_half_width
    y = -0.02
    while y < 1.05:
        h = 0.028 + 0.018 * np.clip(y, 0, 1)
        anatomy.vertebrae.append(_ellipse((cx, y + h / 2), (sw * (0.85 + 0.3 * np.clip(y, 0, 1)), h * 0.42), 0.0, 5.0, 32))
        for side in (-1, 1):
            anatomy.pedicles.append(_ellipse((cx + side * sw * 0.75, y + h * 0.4), (sw * 0.22, h * 0.25), 0.0, 2.0, 16))
        y += h

    for side in (-1, 1):
        # Scapula: a faint wedge over the upper lateral chest.
        sx = cx + side * (lateral + rng.uniform(-0.03, 0.01))
        anatomy.scapulae.append(np.array([(sx + side * 0.06, shoulder_y + 0.03), (sx - side * 0.07, shoulder_y + 0.08),
                                          (sx - side * 0.02, 0.42 + rng.uniform(-0.03, 0.03)),
                                          (sx + side * 0.05, 0.3)]))
        anatomy.humeri.append(_ellipse((cx + side * (bw * 1.05 + rng.uniform(0.0, 0.04)), shoulder_y + 0.07),
                                       (0.065, 0.075), 0.0, 2.0, 40))
    if rng.random() < 0.4:  # breast shadows over the lower lung fields
        for side in (-1, 1):
            anatomy.breasts.append(_ellipse((cx + side * lateral * 0.7, dome_r + rng.uniform(-0.02, 0.04)),
                                            (lateral * 0.55, rng.uniform(0.12, 0.17)), 0.0, 2.0, 40))

    # Hila and vessel trees fanning out into each lung.
    for side, name in ((-1, "right_lung"), (1, "left_lung")):
        hilum = np.array([cx + side * (right_r if side < 0 else left_r * 0.6) * rng.uniform(0.75, 0.95),
                          heart_top + rng.uniform(-0.05, 0.0)])
        anatomy.hila.append(_ellipse(tuple(hilum), (0.03, 0.05), side * 0.3, 2.0, 24))
        base = np.pi / 2 - side * np.pi / 2  # pointing laterally
        for angle in np.linspace(-1.1, 1.2, 7):
            direction = base + side * (-angle) + rng.normal(0, 0.08)
            _vessel_tree(rng, hilum, direction, rng.uniform(0.06, 0.09), rng.uniform(0.006, 0.009), 3,
                         anatomy.vessels)
    return anatomy


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
        p = np.asarray(points, dtype=np.float64)
        x = (p[:, 0] - 0.5) * self.sx + self.shift[0]
        y = (p[:, 1] - 0.5) * self.sy + self.shift[1]
        c, s = np.cos(self.angle), np.sin(self.angle)
        px = self.width / 2 + c * x - s * y
        py = self.height / 2 + s * x + c * y
        return list(zip(px.tolist(), py.tolist()))

    def length_px(self, length: float) -> float:
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
        w = max(1, round(self.frame.length_px(width)))
        self.draw.line(self.frame.to_px(points), fill=float(value), width=w, joint="curve")

    def array(self) -> np.ndarray:
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
    """Draw a tubular bone: a bright cortex with a dimmer medullary centre."""
    canvas.line(line, width, value)
    canvas.line(line, width * 0.5, value * marrow)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _make_frame(rng: np.random.Generator, shape: tuple[int, int]) -> _Frame:
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
    px = np.sqrt(height * width) / _REFERENCE_SIZE  # pixel-size scale for blur widths

    # --- masks (exact) -------------------------------------------------------
    heart = _mask(frame, anatomy.heart)
    lung_fields = {name: _mask(frame, poly) for name, poly in anatomy.lungs.items()}
    # SCR clavicles: only the part over the lung field (plus a small margin).
    margin = _Canvas(frame)
    for poly in anatomy.lungs.values():
        margin.polygon(poly)
        margin.line(np.concatenate([poly, poly[:1]]), 0.012)
    near_lungs = margin.array() > 0.5
    masks = {
        "heart": heart,
        "left_lung": lung_fields["left_lung"] & ~heart,
        "right_lung": lung_fields["right_lung"] & ~heart,
        "left_clavicle": _mask(frame, anatomy.clavicles["left_clavicle"]) & near_lungs,
        "right_clavicle": _mask(frame, anatomy.clavicles["right_clavicle"]) & near_lungs,
    }
    assert set(masks) == set(SCR_STRUCTURES)

    # --- image: additive density in display units (bright = dense) ------------
    body_sharp = _mask(frame, anatomy.body).astype(np.float32)
    body_depth = _smooth_lowres(frame, [anatomy.body], 0.05)  # rounded chest wall
    density = body_sharp * (rng.uniform(0.35, 0.45) + rng.uniform(0.35, 0.5) * body_depth)

    lung_any = (lung_fields["left_lung"] | lung_fields["right_lung"]).astype(np.float32)
    lung_depth = _smooth_lowres(frame, list(anatomy.lungs.values()), 0.035)
    heart_soft = ndimage.gaussian_filter(heart.astype(np.float32), 1.2 * px)
    lung_edge = ndimage.gaussian_filter(lung_any, 1.0 * px)
    air = lung_edge * (0.35 + 0.65 * lung_depth)
    density -= rng.uniform(0.45, 0.55) * air * (1.0 - rng.uniform(0.55, 0.75) * heart_soft)
    density += rng.uniform(0.04, 0.08) * _smooth_lowres(frame, [anatomy.heart], 0.02)  # heart is thick

    # Small-scale anatomy on one full-resolution canvas each, then one blur.
    soft = _Canvas(frame)  # soft tissue and air structures
    soft.polygon(anatomy.trachea, -0.12)
    if anatomy.stomach_bubble is not None:
        soft.polygon(anatomy.stomach_bubble, -0.2)
    for hilum in anatomy.hila:
        soft.polygon(hilum, 0.05)
    for segment, w in anatomy.vessels:
        soft.line(segment, w, 0.07)
    for breast in anatomy.breasts:
        soft.polygon(breast, 0.05)
    soft_layer = soft.array()
    density += ndimage.gaussian_filter(soft_layer, 1.6 * px)

    # Lung parenchyma texture: band-pass noise only inside the lungs.
    texture = rng.standard_normal((max(1, height // 2), max(1, width // 2)), dtype=np.float32)
    texture = ndimage.gaussian_filter(texture, 1.2)
    texture = _upsample(texture, frame)
    density += rng.uniform(0.02, 0.035) * texture * lung_edge

    bones = _Canvas(frame)
    posterior = _Canvas(frame)
    for rib in anatomy.posterior_ribs:
        _bone_band(posterior, rib, anatomy.rib_width, 1.0)
    anterior = _Canvas(frame)
    for rib in anatomy.anterior_ribs:
        _bone_band(anterior, rib, anatomy.rib_width * 0.85, 1.0, marrow=0.7)
    for verte in anatomy.vertebrae:
        bones.polygon(verte, 0.6)
    for ped in anatomy.pedicles:
        bones.polygon(ped, 1.0)
    for scap in anatomy.scapulae:
        bones.polygon(_catmull_rom(scap, 8, closed=True), 0.2)
    for hum in anatomy.humeri:
        bones.polygon(hum, 0.7)
    for clav in anatomy.clavicles.values():
        bones.polygon(clav, 1.0)
    bone = (
        rng.uniform(0.10, 0.14) * posterior.array()
        + rng.uniform(0.05, 0.08) * anterior.array()
        + rng.uniform(0.14, 0.2) * bones.array()
    )
    density += ndimage.gaussian_filter(bone, 1.0 * px) * body_sharp

    # Spine column (visible through the mediastinum) as a smooth band.
    spine_poly = np.array([(anatomy.spine_x - anatomy.spine_half_width, -0.2),
                           (anatomy.spine_x + anatomy.spine_half_width, -0.2),
                           (anatomy.spine_x + anatomy.spine_half_width * 1.25, 1.3),
                           (anatomy.spine_x - anatomy.spine_half_width * 1.25, 1.3)])
    density += rng.uniform(0.06, 0.1) * _smooth_lowres(frame, [spine_poly], 0.008)

    # --- film response, exposure gradient, blur and noise ---------------------
    k = rng.uniform(1.3, 2.2)
    image = (1.0 - np.exp(-k * np.clip(density, 0.0, None))) / (1.0 - np.exp(-k))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / height - 0.5, xx / width - 0.5
    gx, gy, gq = rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08), rng.uniform(-0.1, 0.05)
    image = image * rng.uniform(0.85, 1.0) + rng.uniform(0.02, 0.08) + gx * xx + gy * yy + gq * (xx * xx + yy * yy)
    image = ndimage.gaussian_filter(image.astype(np.float32), rng.uniform(0.5, 1.0) * px)
    noise = rng.standard_normal((height, width), dtype=np.float32)
    image = image + rng.uniform(0.006, 0.018) * noise
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    return image, masks
