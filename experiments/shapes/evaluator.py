"""A second instrument for the shapes world: grades an image against its caption, built apart from ``measure``.

``world.measure`` is the loop's own eye: the measuring judge and detector (``backends.py``) answer with it, so
the pictures the loop learns to draw are the pictures it likes. Reporting the loop's gains with the same
instrument would let any leniency of it count as progress, and a review found it lenient where a generated
image is likely to go wrong: a hollow ring is a perfect circle (the outer contour fills the hole), blue-violet
is purple (nearest palette colour within a wide distance), the purple half of a half-muddy or two-tone circle
is an object. This module grades the same images another way, strictly, and no loop role imports it.

How it differs, part by part:

- colour: strict hue bands in HSV around each palette colour, with a floor on chroma (max - min channel).
  A mix of an object colour with a neutral background keeps the colour's hue and scales its chroma by the
  mix, so an anti-aliased edge pixel reads as its colour down to half coverage and as unknown below; a pixel
  of another hue (orange, blue-violet) is no colour at all, however near it lies to a palette colour.
  Backgrounds are neutral pixels (low chroma) in a luminance band.
- components: its own run-length labelling (runs of equal label per row, joined across rows by a vectorised
  union of overlapping runs), over the pixels of each colour and over everything that is not background.
  A component of the latter that holds two object colours, or many pixels of no colour away from its edge,
  is a two-tone or muddy object, and none of its parts is a correct object.
- shape: the intersection over union of the component's own pixels (holes not filled) with the best regular
  disc, square, triangle and five-pointed star centred at its centroid, over a grid of sizes and rotations,
  the templates' insides tested analytically (a polar inside test per class). A component with an enclosed
  hole is reported as having one and never graded as a correct object; below ``MIN_IOU`` it is a blob.
- counts: components of at least ``MIN_AREA`` pixels (a disc of radius ~3.8 px); two discs that overlap are
  one component, which fits no disc.

``validation_table`` checks both instruments on probes of known truth (exact renders, and images that must be
graded wrong); ``python -m experiments.shapes.evaluator`` prints it (docs/evaluator.md).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from experiments.shapes import world

COLOUR_NAMES = tuple(world.COLOURS)
BACKGROUND_NAMES = tuple(world.BACKGROUNDS)
UNKNOWN = "unknown"
BLOB = "blob"

# --------------------------------------------------------------------------------------------------------------
# colour bands


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees, chroma (max - min channel, 0-255) and saturation (chroma / max) of float RGB pixels."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = rgb.max(-1)
    chroma = mx - rgb.min(-1)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    return hue * 60.0, chroma, chroma / np.maximum(mx, 1.0)


_PALETTE_HUE, _PALETTE_CHROMA, _ = _hue_chroma(np.array(list(world.COLOURS.values()), dtype=np.float64))
# Half-width of each colour's hue band, in degrees. Narrow where a neighbour lies close: orange (~28 deg) sits
# between red (0) and yellow (51), blue-violet and indigo (~245-262) between blue (228) and purple (282).
HUE_HALF_WIDTH = {"red": 12.0, "green": 20.0, "blue": 14.0, "yellow": 12.0, "purple": 14.0}
# A pixel is its colour from half coverage up: an edge pixel mixed half with the background keeps the hue and
# half the chroma, so this floor drops the outer half of an anti-aliased edge without eroding the shape.
MIN_COVERAGE = 0.5
MIN_SATURATION = 0.25  # and pale tints (chroma large only because the colour is bright) are no colour
# Background: neutral pixels, in a luminance band per background (the palette's are 0.96, 0.49 and 0.08).
NEUTRAL_MAX_CHROMA = 28.0
LUMINANCE_BANDS = {"white": (0.80, 1.01), "gray": (0.33, 0.65), "black": (-0.01, 0.22)}
# The background is the neutral class of most pixels, when it holds this share of the neutral pixels and the
# neutral pixels this share of the image; otherwise "unknown" (a split or a coloured background).
MIN_BACKGROUND_SHARE = 0.75
MIN_NEUTRAL_SHARE = 0.30

# Component constants, in pixels of a 64 px image (the smallest rendered object covers ~90 px).
MIN_AREA = 45  # smaller components are specks: a disc of radius 3 (28 px) is not an object
# A component whose best class fits worse than this is a blob. Renders blurred up to 1.2 px and noised fit
# their class at >= 0.96 (circle, square), 0.92 (triangle), 0.90 (star); two overlapping discs fit a disc or
# a square at up to ~0.81.
MIN_IOU = {"circle": 0.88, "square": 0.87, "triangle": 0.82, "star": 0.78}
# A hole is an enclosed region of at least this many pixels and this share of the filled component.
MIN_HOLE_AREA = 4
MIN_HOLE_SHARE = 0.03
# Two-tone: a second object colour covering this share of the first's pixels in one non-background component;
# muddy: pixels of no colour that are away from the background (or strongly coloured in a hue of no band)
# covering this share of the component.
MIN_SECOND_COLOUR_SHARE = 0.15
MIN_SECOND_COLOUR_AREA = 12
MAX_OFF_SHARE = 0.2
MIN_OFF_AREA = 15
EDGE_WIDTH = 2  # pixels of no colour this close to the background are an anti-aliased or blurred edge
FOREIGN_CHROMA = 50.0  # chroma above which a pixel of no band is a foreign colour, not an edge


def classify_pixels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: 0..4 an object colour (``COLOUR_NAMES`` order), 5..7 a background (``BACKGROUNDS``
    order), -1 unknown; and whether an unknown pixel is a foreign colour (strong chroma in a hue of no band),
    which no anti-aliased or blurred edge against a neutral background can make."""
    hue, chroma, saturation = _hue_chroma(rgb)
    out = np.full(hue.shape, -1, dtype=np.int8)
    in_band = np.zeros(hue.shape, dtype=bool)
    for k, name in enumerate(COLOUR_NAMES):
        band = np.abs((hue - _PALETTE_HUE[k] + 180.0) % 360.0 - 180.0) <= HUE_HALF_WIDTH[name]
        in_band |= band
        out[band & (chroma >= MIN_COVERAGE * _PALETTE_CHROMA[k]) & (saturation >= MIN_SATURATION)] = k
    luminance = rgb.mean(-1) / 255.0
    neutral = chroma <= NEUTRAL_MAX_CHROMA
    for k, name in enumerate(BACKGROUND_NAMES):
        lo, hi = LUMINANCE_BANDS[name]
        out[neutral & (luminance >= lo) & (luminance < hi)] = len(COLOUR_NAMES) + k
    return out, (out < 0) & ~in_band & (chroma >= FOREIGN_CHROMA)


# --------------------------------------------------------------------------------------------------------------
# connected components


def label_components(values: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of equal non-negative values (-1: no pixel), numbered 1..n in raster order of
    their first pixel; 0 where ``values`` is negative.

    Runs of equal value are found per row with numpy; a run touches the runs of the next row that overlap it
    (one pixel wider on each side for 8-connectivity), found by binary search on the runs' sorted keys; the
    runs are then joined by hooking roots to the smaller root and compressing, until no edge joins two roots.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity is 4 or 8, got {connectivity}")
    v = np.asarray(values)
    h, w = v.shape
    left = np.full_like(v, -1)
    left[:, 1:] = v[:, :-1]
    right = np.full_like(v, -1)
    right[:, :-1] = v[:, 1:]
    ys, xs = np.nonzero((v >= 0) & (v != left))
    _, xe = np.nonzero((v >= 0) & (v != right))  # inclusive ends, paired with the starts in raster order
    n = len(ys)
    if n == 0:
        return np.zeros((h, w), dtype=np.int32), 0
    reach = 1 if connectivity == 8 else 0
    key = w + 4  # a row's keys never reach the next row's, even widened by one pixel
    start_keys = ys * key + xs
    end_keys = ys * key + xe
    lo = np.searchsorted(end_keys, (ys + 1) * key + xs - reach, side="left")
    hi = np.searchsorted(start_keys, (ys + 1) * key + xe + reach, side="right")
    counts = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(n), counts)
    b = np.repeat(lo, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    run_values = v[ys, xs]
    same = run_values[a] == run_values[b]
    a, b = a[same], b[same]
    parent = np.arange(n)
    while a.size:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        ra, rb = ra[differ], rb[differ]
        low = np.minimum(ra, rb)
        np.minimum.at(parent, ra, low)
        np.minimum.at(parent, rb, low)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    roots, run_label = np.unique(parent, return_inverse=True)
    run_label = run_label.reshape(-1) + 1
    flat = np.zeros(h * w + 1, dtype=np.int64)
    flat[ys * w + xs] += run_label
    ends = np.zeros(h * w + 1, dtype=np.int64)
    ends[ys * w + xe + 1] = run_label
    labels = np.cumsum(flat - ends)[: h * w].reshape(h, w).astype(np.int32)
    return labels, len(roots)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square (chessboard) dilation by ``radius`` pixels, separable."""
    out = mask.copy()
    for axis in (0, 1):
        grown = out.copy()
        for d in range(1, radius + 1):
            if axis == 0:
                grown[d:] |= out[:-d]
                grown[:-d] |= out[d:]
            else:
                grown[:, d:] |= out[:, :-d]
                grown[:, :-d] |= out[:, d:]
        out = grown
    return out


def hole_area(mask: np.ndarray) -> int:
    """Pixels enclosed by a component (4-connected regions of its complement that do not reach the border of
    its padded bounding box)."""
    ys, xs = np.nonzero(mask)
    window = np.zeros((ys.max() - ys.min() + 3, xs.max() - xs.min() + 3), dtype=bool)
    window[ys - ys.min() + 1, xs - xs.min() + 1] = True
    labels, n = label_components(np.where(window, -1, 0), connectivity=4)
    if n <= 1:
        return 0
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    enclosed = ~np.isin(labels, border) & (labels > 0)
    return int(enclosed.sum())


# --------------------------------------------------------------------------------------------------------------
# shape fitting


def _polygon_ratio(rho: np.ndarray, phi: np.ndarray, angles: np.ndarray, sides: int) -> np.ndarray:
    """Per rotation and pixel, the circumradius of the smallest regular ``sides``-gon (a vertex at each
    rotation) that holds the pixel: inside iff this is <= R. The nearest edge's normal decides."""
    sector = 2 * math.pi / sides
    psi = (phi[None, :] - angles[:, None] - sector / 2) % sector - sector / 2
    return rho[None, :] * np.cos(psi) / math.cos(math.pi / sides)


STAR_INNER = 0.45  # the world's star: ten vertices, the inner ones at 0.45 of the circumradius


def _star_line() -> tuple[float, float, float]:
    """The line through a star's outer vertex (1, 0) and the next inner vertex: normal (nx, ny) and offset."""
    ix, iy = STAR_INNER * math.cos(math.pi / 5), STAR_INNER * math.sin(math.pi / 5)
    nx, ny = iy, -(ix - 1.0)
    return nx, ny, nx * 1.0


_STAR_NX, _STAR_NY, _STAR_D = _star_line()


def _star_ratio(rho: np.ndarray, phi: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """As ``_polygon_ratio`` for the five-pointed star: the angle folded onto the half-point between an outer
    vertex and the next inner one, where the boundary is one straight edge."""
    sector = 2 * math.pi / 5
    psi = (phi[None, :] - angles[:, None]) % sector
    psi = np.minimum(psi, sector - psi)
    return rho[None, :] * (_STAR_NX * np.cos(psi) + _STAR_NY * np.sin(psi)) / _STAR_D


# Area of each class per squared circumradius, and the rotations searched (the class's symmetry in 4 deg steps).
_STAR_AREA = 10 * 0.5 * STAR_INNER * math.sin(math.pi / 5)
AREA_FACTOR = {"circle": math.pi, "square": 2.0, "triangle": 3 * math.sqrt(3) / 4, "star": _STAR_AREA}
_ANGLES = {
    "square": np.deg2rad(np.arange(0.0, 90.0, 4.0)),
    "triangle": np.deg2rad(np.arange(0.0, 120.0, 4.0)),
    "star": np.deg2rad(np.arange(0.0, 72.0, 4.0)),
}
# Sizes searched, relative to the farthest pixel from the centroid (a star's blurred tips fall short of it).
_SCALES = np.geomspace(0.6, 1.45, 40)


def fit_shapes(ys: np.ndarray, xs: np.ndarray) -> dict[str, float]:
    """The best IoU of the pixels (their own, holes not filled) with each class's shape centred at their
    centroid, over sizes and rotations.

    For a class, a rotation gives every pixel the circumradius at which the shape starts to hold it; the
    intersection at size R is then the number of pixels at or below R (a cumulative count), the shape's area
    is analytic, and the union follows, so all sizes of all rotations cost one pass over the pixels.
    """
    area = len(ys)
    dy, dx = ys - ys.mean(), xs - xs.mean()
    rho = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    radii = (rho.max() + 0.5) * _SCALES
    out = {}
    for shape in world.CLASSES:
        if shape == "circle":
            ratio = rho[None, :]
        elif shape == "star":
            ratio = _star_ratio(rho, phi, _ANGLES[shape])
        else:
            ratio = _polygon_ratio(rho, phi, _ANGLES[shape], 4 if shape == "square" else 3)
        rows = ratio.shape[0]
        bins = np.searchsorted(radii, ratio.ravel()) + (np.arange(rows) * (len(radii) + 1)).repeat(area)
        inter = np.bincount(bins, minlength=rows * (len(radii) + 1)).reshape(rows, -1).cumsum(1)[:, :-1]
        iou = inter / (area + AREA_FACTOR[shape] * radii[None, :] ** 2 - inter)
        out[shape] = float(iou.max())
    return out


# --------------------------------------------------------------------------------------------------------------
# reading an image


@dataclass(frozen=True)
class ReadObject:
    """One object: a component of one colour (or, with colour "unknown", a component of no colour)."""

    colour: str  # a palette colour, or "unknown"
    shape: str  # the best-fitting class, or "blob" when it fits worse than its MIN_IOU
    iou: float  # the best class's IoU
    ious: dict[str, float]
    area: int
    has_hole: bool
    two_tone: bool  # its non-background component mixes object colours, or holds much of no colour
    centroid: tuple[float, float]  # (x, y) in pixels


@dataclass
class Reading:
    background: str  # a background name, or "unknown"
    objects: list[ReadObject] = field(default_factory=list)
    specks: int = 0  # non-background components too small (or too faint) to be objects


def _as_array(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    if image.size != (world.SIZE, world.SIZE):
        image = image.resize((world.SIZE, world.SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _object(colour: str, ys: np.ndarray, xs: np.ndarray, two_tone: bool) -> ReadObject:
    mask = np.zeros((world.SIZE, world.SIZE), dtype=bool)
    mask[ys, xs] = True
    holes = hole_area(mask)
    ious = fit_shapes(ys.astype(np.float64), xs.astype(np.float64))
    best = max(ious, key=ious.get)
    return ReadObject(
        colour=colour,
        shape=best if ious[best] >= MIN_IOU[best] else BLOB,
        iou=round(ious[best], 4),
        ious={k: round(v, 4) for k, v in ious.items()},
        area=len(ys),
        has_hole=holes >= max(MIN_HOLE_AREA, MIN_HOLE_SHARE * (len(ys) + holes)),
        two_tone=two_tone,
        centroid=(float(xs.mean()), float(ys.mean())),
    )


def evaluate(image: Image.Image) -> Reading:
    """Read a scene: its background, and every object's colour, class, fit, hole and purity."""
    rgb = _as_array(image)
    pixels, foreign = classify_pixels(rgb)
    n_colours = len(COLOUR_NAMES)
    neutral_counts = np.bincount(pixels[pixels >= n_colours] - n_colours, minlength=len(BACKGROUND_NAMES))
    bg_index = int(neutral_counts.argmax())
    is_bg = pixels == n_colours + bg_index
    confident = neutral_counts[bg_index] >= MIN_BACKGROUND_SHARE * max(neutral_counts.sum(), 1)
    background = (
        BACKGROUND_NAMES[bg_index] if confident and is_bg.mean() >= MIN_NEUTRAL_SHARE * 1.0 else UNKNOWN
    )
    reading = Reading(background=background)

    regions, n_regions = label_components(np.where(is_bg, -1, 0))
    if n_regions == 0:
        return reading
    coloured = (pixels >= 0) & (pixels < n_colours)
    parts, n_parts = label_components(np.where(coloured, pixels, -1))
    region_area = np.bincount(regions.ravel(), minlength=n_regions + 1)
    per_colour = np.bincount(
        regions[coloured] * n_colours + pixels[coloured], minlength=(n_regions + 1) * n_colours
    ).reshape(n_regions + 1, n_colours)
    unknown = ~is_bg & ~coloured
    off = unknown & (~_dilate(is_bg, EDGE_WIDTH) | foreign)
    off_area = np.bincount(regions[off], minlength=n_regions + 1)

    # Each part (a one-colour component) lies in one region; its pixels, grouped by part.
    part_flat = parts.ravel()
    order = np.argsort(part_flat, kind="stable")
    part_area = np.bincount(part_flat, minlength=n_parts + 1)
    bounds = np.concatenate([[0], np.cumsum(part_area)])
    part_region = np.zeros(n_parts + 1, dtype=np.int64)
    part_region[part_flat[order[bounds[1:-1]]]] = regions.ravel()[order[bounds[1:-1]]]
    part_colour = np.zeros(n_parts + 1, dtype=np.int64)
    part_colour[part_flat[order[bounds[1:-1]]]] = pixels.ravel()[order[bounds[1:-1]]]

    bg_rgb = np.median(rgb[is_bg], axis=0) if is_bg.any() else np.zeros(3, dtype=np.float32)
    contrast = np.linalg.norm(rgb - bg_rgb, axis=-1)
    for region in range(1, n_regions + 1):
        if region_area[region] < MIN_AREA:
            reading.specks += 1
            continue
        counts = np.sort(per_colour[region])[::-1]
        two_tone = bool(
            counts[1] >= max(MIN_SECOND_COLOUR_AREA, MIN_SECOND_COLOUR_SHARE * counts[0])
            or (counts[0] > 0 and off_area[region] >= max(MIN_OFF_AREA, MAX_OFF_SHARE * region_area[region]))
        )
        mine = [p for p in range(1, n_parts + 1) if part_region[p] == region and part_area[p] >= MIN_AREA]
        for p in mine:
            flat = order[bounds[p] : bounds[p + 1]]
            ys, xs = np.divmod(flat, world.SIZE)
            reading.objects.append(_object(COLOUR_NAMES[part_colour[p]], ys, xs, two_tone))
        if mine:
            continue
        if counts.sum() >= 0.1 * region_area[region]:
            reading.specks += 1  # coloured but too small: a speck with its blurred halo
            continue
        # No colour at all (orange, blue-violet, gray on white): an object of unknown colour, its shape read
        # from the pixels that differ from the background at least half as much as the region's most do.
        inside = regions == region
        core = inside & (contrast >= 0.5 * np.percentile(contrast[inside], 90))
        ys, xs = np.nonzero(core)
        if len(ys) < MIN_AREA:
            reading.specks += 1
            continue
        reading.objects.append(_object(UNKNOWN, ys, xs, two_tone=False))
    return reading


# --------------------------------------------------------------------------------------------------------------
# grading


@dataclass(frozen=True)
class Grade:
    count: bool  # as many solid objects of the class as asked
    colour: bool  # at least one, and every solid object of the class in the asked colour
    background: bool
    exact: bool  # count, colour and background right, and no other object (no blob, ring, mixed object)
    ring: bool  # an object in the asked colour has a hole
    two_tone: bool  # some object mixes colours or is muddy
    present: bool  # at least one solid object of the class, whatever its colour


def grade(spec: world.SceneSpec, reading: Reading) -> Grade:
    """Grade a reading against what a caption asks for.

    Only solid objects (a class's shape, no hole, one clean colour) can be the asked objects; a ring, a
    two-tone half or a blob is never one, and is one of the "other" objects that make the image inexact.
    """
    solid = [o.shape == spec.shape and not o.has_hole and not o.two_tone for o in reading.objects]
    mine = [o for o, s in zip(reading.objects, solid, strict=True) if s]
    count = len(mine) == spec.count
    colour = bool(mine) and all(o.colour == spec.colour for o in mine)
    background = reading.background == spec.background
    others = not all(solid)
    return Grade(
        count=count,
        colour=colour,
        background=background,
        exact=count and colour and background and not others,
        ring=any(o.has_hole and o.colour == spec.colour for o in reading.objects),
        two_tone=any(o.two_tone for o in reading.objects),
        present=bool(mine),
    )


def grade_image(prompt: str, image: Image.Image) -> dict[str, bool]:
    """Grade an image against a caption of the world's grammar; a prompt that is no caption is an error."""
    spec = world.parse_caption(prompt)
    if spec is None:
        raise ValueError(f"not a caption of the shapes world: {prompt!r}")
    return asdict(grade(spec, evaluate(image)))


# --------------------------------------------------------------------------------------------------------------
# validation: probes of known truth, graded by both instruments


@dataclass
class Probe:
    kind: str
    spec: world.SceneSpec
    image: Image.Image
    expect: dict[str, bool]  # the grade fields whose true value the probe fixes


_S = world.SUPERSAMPLE


def _draw(draw: ImageDraw.ImageDraw, shape: str, obj: world.PlacedObject, fill: int | tuple) -> None:
    """One object at the world's supersampled scale, drawn as ``world.render`` draws it."""
    if shape == "circle":
        r, cx, cy = obj.size * _S, obj.x * _S, obj.y * _S
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(world._polygon(shape, obj, _S), fill=fill)


def _scene(background: str, items: list[tuple[str, world.PlacedObject, tuple[int, int, int]]]) -> Image.Image:
    big = Image.new("RGB", (world.SIZE * _S, world.SIZE * _S), world.BACKGROUNDS[background])
    draw = ImageDraw.Draw(big)
    for shape, obj, fill in items:
        _draw(draw, shape, obj, fill)
    return big


def _finish(big: Image.Image, rng: random.Random, blur: float, noise: float) -> Image.Image:
    """Down to 64 px (box filter, as the renderer), then a Gaussian blur of up to ``blur`` px and pixel noise
    of up to ``noise`` (standard deviation, 0-255 scale), each drawn uniformly."""
    image = big.resize((world.SIZE, world.SIZE), Image.Resampling.BOX)
    sigma = rng.uniform(0.0, blur)
    if sigma > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(sigma))
    level = rng.uniform(0.0, noise)
    if level > 0:
        noisy = np.asarray(image, dtype=np.float64)
        noisy = noisy + np.random.default_rng(rng.randrange(2**32)).normal(0.0, level, noisy.shape)
        image = Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))
    return image


def _hsv_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(h / 360.0, s, v)
    return round(255 * r), round(255 * g), round(255 * b)


_ALL_SPECS = [s for shape in world.CLASSES for s in world.all_specs(shape)]
MILD_BLUR, MILD_NOISE = 0.8, 3.0  # what every probe of a wrong image gets, so no probe is a clean render


def _random_spec(rng: random.Random, **fixed: object) -> world.SceneSpec:
    parts = {
        "shape": rng.choice(world.CLASSES),
        "count": rng.choice(world.COUNTS),
        "colour": rng.choice(COLOUR_NAMES),
        "background": rng.choice(BACKGROUND_NAMES),
    }
    return world.SceneSpec(**(parts | fixed))


def _render_probe(blur: float, noise: float) -> Callable[[random.Random, int], tuple]:
    def make(rng: random.Random, i: int) -> tuple[world.SceneSpec, Image.Image]:
        spec = _ALL_SPECS[i % len(_ALL_SPECS)]
        objects = world.place_objects(spec, rng)
        if blur == 0 and noise == 0:
            return spec, world.render(spec, objects)
        fill = world.COLOURS[spec.colour]
        return spec, _finish(
            _scene(spec.background, [(spec.shape, o, fill) for o in objects]), rng, blur, noise
        )

    return make


def _ring(rng: random.Random, i: int) -> tuple[world.SceneSpec, Image.Image]:
    """Circles drawn hollow: a hole of 0.3-0.7 of the radius (a thick ring fits a disc well, a thin one not)."""
    spec = _random_spec(rng, shape="circle")
    big = _scene(spec.background, [])
    draw = ImageDraw.Draw(big)
    for obj in world.place_objects(spec, rng):
        _draw(draw, "circle", obj, world.COLOURS[spec.colour])
        hole = world.PlacedObject(obj.x, obj.y, obj.size * rng.uniform(0.3, 0.7), 0.0)
        _draw(draw, "circle", hole, world.BACKGROUNDS[spec.background])
    return spec, _finish(big, rng, MILD_BLUR, MILD_NOISE)


def _two_tone(second: Callable[[random.Random], tuple[int, int, int]]):
    """Purple objects with a part in another colour: the part beyond a straight cut at a random angle, the cut
    0-0.4 circumradii off the centre, so the other colour takes a quarter to a half of the object."""

    def make(rng: random.Random, i: int) -> tuple[world.SceneSpec, Image.Image]:
        spec = _random_spec(rng, colour="purple")
        big = _scene(spec.background, [])
        far = 4.0 * big.size[0]
        for obj in world.place_objects(spec, rng):
            _draw(ImageDraw.Draw(big), spec.shape, obj, world.COLOURS["purple"])
            angle, shift = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.4) * obj.size * _S
            nx, ny = math.cos(angle), math.sin(angle)  # the cut's normal, pointing into the other part
            cx, cy = obj.x * _S + shift * nx, obj.y * _S + shift * ny
            plane = Image.new("L", big.size, 0)
            ImageDraw.Draw(plane).polygon(
                [
                    (cx - far * ny, cy + far * nx),
                    (cx + far * ny, cy - far * nx),
                    (cx + far * ny + far * nx, cy - far * nx + far * ny),
                    (cx - far * ny + far * nx, cy + far * nx + far * ny),
                ],
                fill=255,
            )
            mask = Image.new("L", big.size, 0)
            _draw(ImageDraw.Draw(mask), spec.shape, obj, 255)
            big.paste(second(rng), (0, 0, *big.size), ImageChops.multiply(mask, plane))
        return spec, _finish(big, rng, MILD_BLUR, MILD_NOISE)

    return make


def _orange(rng: random.Random) -> tuple[int, int, int]:
    return _hsv_rgb(rng.uniform(22.0, 34.0), rng.uniform(0.7, 0.9), rng.uniform(0.85, 0.95))


def _muddy(rng: random.Random) -> tuple[int, int, int]:
    """A dull brown-gray, as a generated colour gone muddy."""
    return _hsv_rgb(rng.uniform(15.0, 45.0), rng.uniform(0.2, 0.35), rng.uniform(0.45, 0.7))


def _off_purple(rng: random.Random, i: int) -> tuple[world.SceneSpec, Image.Image]:
    """Circles of a purple prompt in blue-violet or indigo (hue 246-262 deg, between blue and purple)."""
    spec = _random_spec(rng, shape="circle", colour="purple")
    fill = (90, 60, 220) if i % 4 == 0 else _hsv_rgb(rng.uniform(246, 262), rng.uniform(0.6, 0.85), 0.8)
    items = [("circle", o, fill) for o in world.place_objects(spec, rng)]
    return spec, _finish(_scene(spec.background, items), rng, MILD_BLUR, MILD_NOISE)


def _merged(rng: random.Random, i: int) -> tuple[world.SceneSpec, Image.Image]:
    """ "Two circles" drawn as two discs overlapping (centres 0.9-1.6 radii apart): one peanut-shaped blob."""
    spec = _random_spec(rng, shape="circle", count=2)
    r = rng.uniform(8.5, 11.0)
    d, a = r * rng.uniform(0.9, 1.6), rng.uniform(0, 2 * math.pi)
    mx, my = rng.uniform(24, 40), rng.uniform(24, 40)
    objects = [
        world.PlacedObject(mx + s * d / 2 * math.cos(a), my + s * d / 2 * math.sin(a), r, 0) for s in (-1, 1)
    ]
    items = [("circle", o, world.COLOURS[spec.colour]) for o in objects]
    return spec, _finish(_scene(spec.background, items), rng, MILD_BLUR, MILD_NOISE)


def _tiny(rng: random.Random, i: int) -> tuple[world.SceneSpec, Image.Image]:
    """One object too few, and a tiny one (circumradius 2-3 px) of the class in its place."""
    spec = _random_spec(rng)
    objects = world.place_objects(spec, rng)
    last = objects[-1]
    objects[-1] = world.PlacedObject(last.x, last.y, rng.uniform(2.0, 3.0), last.angle)
    items = [(spec.shape, o, world.COLOURS[spec.colour]) for o in objects]
    return spec, _finish(_scene(spec.background, items), rng, MILD_BLUR, MILD_NOISE)


def _extra(change: str):
    """The asked objects, and one more of another class (same colour) or another colour (same class)."""

    def make(rng: random.Random, i: int) -> tuple[world.SceneSpec, Image.Image]:
        spec = _random_spec(rng)
        objects = world.place_objects(
            world.SceneSpec(spec.shape, spec.count + 1, spec.colour, spec.background), rng
        )
        items = [(spec.shape, o, world.COLOURS[spec.colour]) for o in objects[:-1]]
        if change == "class":
            other = rng.choice([c for c in world.CLASSES if c != spec.shape])
            items.append((other, objects[-1], world.COLOURS[spec.colour]))
        else:
            other = rng.choice([c for c in COLOUR_NAMES if c != spec.colour])
            items.append((spec.shape, objects[-1], world.COLOURS[other]))
        return spec, _finish(_scene(spec.background, items), rng, MILD_BLUR, MILD_NOISE)

    return make


_RIGHT = {"count": True, "colour": True, "background": True, "exact": True}
# name -> (maker, the grade fields it fixes, instances by default: every spec once for the renders)
PROBES: dict[str, tuple[Callable[[random.Random, int], tuple], dict[str, bool], int]] = {
    "render (every class, count, colour, background)": (_render_probe(0.0, 0.0), _RIGHT, len(_ALL_SPECS)),
    "render, blur 0-1.2 px": (_render_probe(1.2, 0.0), _RIGHT, len(_ALL_SPECS)),
    "render, blur 0-1.2 px, noise sd 0-5": (_render_probe(1.2, 5.0), _RIGHT, len(_ALL_SPECS)),
    "hollow rings (hole 0.3-0.7 r)": (_ring, {"colour": False, "exact": False}, 40),
    "two-tone: half purple, half orange": (_two_tone(_orange), {"colour": False, "exact": False}, 40),
    "two-tone: half purple, half red": (
        _two_tone(lambda rng: world.COLOURS["red"]),
        {"colour": False, "exact": False},
        40,
    ),
    "half purple, half muddy": (_two_tone(_muddy), {"colour": False, "exact": False}, 40),
    "blue-violet/indigo for purple": (_off_purple, {"colour": False, "exact": False}, 40),
    "two circles merged into one blob": (_merged, {"count": False, "exact": False}, 40),
    "one object tiny (r 2-3 px)": (_tiny, {"count": False, "exact": False}, 40),
    "extra object of another class": (_extra("class"), {"exact": False}, 40),
    "extra object of another colour": (_extra("colour"), {"exact": False}, 40),
}


def probes(kind: str, n: int | None = None, seed: int = 0) -> list[Probe]:
    """``n`` instances of a probe kind (its default number when None), reproducible from ``seed``."""
    make, expect, default = PROBES[kind]
    out = []
    for i in range(default if n is None else n):
        spec, image = make(random.Random(f"evaluator-probe:{kind}:{seed}:{i}"), i)
        out.append(Probe(kind, spec, image, expect))
    return out


def agrees(probe: Probe, grades: dict[str, bool]) -> bool:
    return all(grades[k] == v for k, v in probe.expect.items())


def _truth(expect: dict[str, bool]) -> str:
    if expect == _RIGHT:
        return "all right"
    return ", ".join(f"{k} {'right' if v else 'wrong'}" for k, v in expect.items())


def validation_table(n: int | None = None, seed: int = 0) -> list[dict[str, object]]:
    """Per probe kind: how often the evaluator and ``world.measure`` + ``world.accuracy`` grade the probes as
    their truth says (every fixed field right), and how often the evaluator flags a ring or a mixed object."""
    rows = []
    for kind, (_, expect, _) in PROBES.items():
        ours = theirs = rings = mixed = 0
        batch = probes(kind, n, seed)
        for probe in batch:
            g = asdict(grade(probe.spec, evaluate(probe.image)))
            ours += agrees(probe, g)
            rings += g["ring"]
            mixed += g["two_tone"]
            theirs += agrees(probe, asdict(world.accuracy(probe.spec, world.measure(probe.image))))
        rows.append(
            {
                "probe": kind,
                "n": len(batch),
                "truth": _truth(expect),
                "evaluator": ours / len(batch),
                "world.measure": theirs / len(batch),
                "ring flagged": rings / len(batch),
                "two-tone flagged": mixed / len(batch),
            }
        )
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    head = list(rows[0])
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if h in ("probe", "truth") else "---:" for h in head) + "|",
    ]
    for row in rows:
        cells = [f"{100 * v:.0f}%" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing(images: list[Image.Image], repeats: int = 3) -> dict[str, float]:
    """Milliseconds per image of ``evaluate`` and of ``world.measure`` (best of ``repeats`` passes)."""
    out = {}
    for name, fn in (("evaluate", evaluate), ("world.measure", world.measure)):
        fn(images[0])  # warm caches (world.measure builds its prototypes once)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for image in images:
                fn(image)
            best = min(best, time.perf_counter() - start)
        out[name] = 1000 * best / len(images)
    return out


def main() -> None:
    rows = validation_table()
    print(markdown(rows))
    images = [p.image for kind in PROBES for p in probes(kind, 40)]
    ms = timing(images)
    print()
    print(
        f"{len(images)} probe images, one process: evaluate {ms['evaluate']:.2f} ms per image, "
        f"world.measure {ms['world.measure']:.2f} ms per image"
    )


if __name__ == "__main__":
    main()
