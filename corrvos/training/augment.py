"""Augmentation primitives for training clips: one geometry for image, mask and boxes.

Every geometric augmentation of a frame is ONE 3x3 matrix ``M`` that maps source *edge*
coordinates to output edge coordinates. Edge coordinates put pixel ``i`` on the interval
``[i, i + 1)``, so a ``W x H`` image spans ``[0, W] x [0, H]`` and a box ``(x1, y1, x2, y2)`` that
covers a whole image is ``(0, 0, W, H)``. Composing the upstream transforms (flip, resized crop,
affine, resize, crop) into one matrix and resampling once means that the image (bicubic or
bilinear), the label map (nearest) and the proposal boxes (corners) see exactly the same
transform, with one interpolation instead of three.

Randomness always comes from a ``numpy.random.Generator`` handed in by the caller, so that a
sample is a pure function of its seed (see ``corrvos.training.samples``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from corrvos.imageops import IM_MEAN_255

Matrix = np.ndarray  # (3, 3) float64, source edge coords -> output edge coords

_INTERP = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


# ----------------------------------------------------------------------------------------------- matrices

def translate(tx: float, ty: float) -> Matrix:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def scale(sx: float, sy: float | None = None) -> Matrix:
    return np.diag([sx, sx if sy is None else sy, 1.0])


def hflip(width: float) -> Matrix:
    """Mirror ``[0, width]`` onto itself (edge coordinates: x -> width - x)."""
    return np.array([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def affine_about(cx: float, cy: float, angle: float = 0.0, shear_x: float = 0.0, shear_y: float = 0.0,
                 zoom: float = 1.0) -> Matrix:
    """Rotation (degrees), x/y shear (degrees) and isotropic zoom about the point ``(cx, cy)``.

    Same family of maps as ``torchvision.transforms.RandomAffine`` (which also works about the
    image centre); the exact composition order differs, which only changes the distribution of
    the random maps marginally.
    """
    a = math.radians(angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    shx = np.array([[1.0, math.tan(math.radians(shear_x))], [0.0, 1.0]])
    shy = np.array([[1.0, 0.0], [math.tan(math.radians(shear_y)), 1.0]])
    lin = np.eye(3)
    lin[:2, :2] = zoom * rot @ shx @ shy
    return translate(cx, cy) @ lin @ translate(-cx, -cy)


def resized_crop(x0: float, y0: float, w: float, h: float, out_w: int, out_h: int) -> Matrix:
    """Map the source window ``[x0, x0 + w] x [y0, y0 + h]`` onto ``[0, out_w] x [0, out_h]``."""
    return scale(out_w / w, out_h / h) @ translate(-x0, -y0)


def random_affine(rng: np.random.Generator, cx: float, cy: float, degrees: float = 0.0,
                  zoom: tuple[float, float] = (1.0, 1.0), shear: float = 0.0) -> Matrix:
    """A RandomAffine draw: angle in ±degrees, zoom in the range, x-shear in ±shear (upstream's shear=10)."""
    angle = rng.uniform(-degrees, degrees) if degrees else 0.0
    z = rng.uniform(*zoom) if zoom != (1.0, 1.0) else 1.0
    sh = rng.uniform(-shear, shear) if shear else 0.0
    return affine_about(cx, cy, angle=angle, shear_x=sh, zoom=z)


def random_resized_crop_window(rng: np.random.Generator, width: int, height: int,
                               area_scale: tuple[float, float] = (0.36, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[float, float, float, float]:
    """Window ``(x0, y0, w, h)`` of RandomResizedCrop: area fraction in ``area_scale``, log-uniform aspect.

    Like torchvision: ten tries for a window that fits, else the largest centred window whose
    aspect ratio is clamped into ``ratio``.
    """
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*area_scale)
        aspect = math.exp(rng.uniform(*log_r))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            return rng.uniform(0, width - w), rng.uniform(0, height - h), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, width / ratio[0]
    elif aspect > ratio[1]:
        w, h = height * ratio[1], height
    else:
        w, h = width, height
    return (width - w) / 2, (height - h) / 2, w, h


def _to_cv2(m: Matrix) -> np.ndarray:
    """Edge-coordinate matrix -> the 2x3 pixel-centre matrix cv2.warpAffine expects."""
    return (translate(-0.5, -0.5) @ m @ translate(0.5, 0.5))[:2]


# ----------------------------------------------------------------------------------------------- warping

def warp_image(image: np.ndarray, m: Matrix, size: tuple[int, int], interpolation: str = "bicubic",
               fill: tuple[int, int, int] = IM_MEAN_255) -> np.ndarray:
    """Resample an RGB uint8 ``HxWx3`` image with ``m`` into an ``(out_h, out_w) = size`` image.

    A strong downscale is first done with area averaging (cv2.INTER_AREA) so that the single
    bicubic/bilinear resampling does not alias, as torchvision's antialiased Resize would not.
    """
    sv = np.linalg.svd(m[:2, :2], compute_uv=False)
    shrink = min(1.0, float(sv.max()) / 0.8)
    if shrink < 0.9:
        h, w = image.shape[:2]
        nw, nh = max(1, round(w * shrink)), max(1, round(h * shrink))
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        m = m @ scale(w / nw, h / nh)
    out = cv2.warpAffine(image, _to_cv2(m), (size[1], size[0]), flags=_INTERP[interpolation],
                         borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(int(c) for c in fill))
    return out


def warp_labels(labels: np.ndarray, m: Matrix, size: tuple[int, int]) -> np.ndarray:
    """Resample a uint8 label map (0 = background) with nearest neighbour; outside is background."""
    return cv2.warpAffine(labels, _to_cv2(m), (size[1], size[0]), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


# ----------------------------------------------------------------------------------------------- boxes

def warp_boxes(boxes: np.ndarray, m: Matrix) -> np.ndarray:
    """Enclosing boxes of the transformed corners of ``(n, 4)`` boxes ``(x1, y1, x2, y2)``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    xs = boxes[:, [0, 2, 2, 0]]
    ys = boxes[:, [1, 1, 3, 3]]
    px = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    py = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    return np.stack([px.min(1), py.min(1), px.max(1), py.max(1)], axis=1)


def clip_boxes(boxes: np.ndarray, size: tuple[int, int], min_side: float,
               min_visible: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Clip ``(n, 4)`` boxes to an ``(h, w)`` image; return the clipped boxes and a keep mask.

    A box is dropped when a clipped side is shorter than ``min_side`` or when less than
    ``min_visible`` of its area is inside the image: a proposal that mostly left the crop no
    longer outlines the object it was proposed for.
    """
    h, w = size
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, w)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, h)
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (cw >= min_side) & (ch >= min_side) & (cw * ch >= min_visible * np.maximum(area, 1e-9))
    return clipped, keep


def boxes_from_labels(labels: np.ndarray, ids: list[int] | np.ndarray) -> np.ndarray:
    """Edge-coordinate bounding box of each id in a label map; ``-1`` rows for ids not present."""
    out = np.full((len(ids), 4), -1.0, dtype=np.float64)
    for k, i in enumerate(ids):
        m = labels == i
        # Row/column projections: two small nonzero calls instead of one over every pixel.
        xs = np.flatnonzero(m.any(0))
        if len(xs):
            ys = np.flatnonzero(m.any(1))
            out[k] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return out


# ----------------------------------------------------------------------------------------------- colour

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale uses them.
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)


def _blend_matrix(factor: float, toward_gray: bool) -> np.ndarray:
    """3x3 colour matrix of ``factor * x + (1 - factor) * gray(x)`` (or ``factor * x`` without the gray term)."""
    m = factor * np.eye(3, dtype=np.float64)
    if toward_gray:
        m += (1.0 - factor) * np.outer(np.ones(3), GRAY_WEIGHTS)
    return m


def _apply_affine_clamped(x: np.ndarray, matrix: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """``clamp(matrix @ x + offset, 0, 1)`` per pixel of a float32 ``HxWx3`` image (one cv2 pass + clip)."""
    out = cv2.transform(x, np.concatenate([matrix, np.full((3, 1), offset)], 1).astype(np.float32))
    return np.clip(out, 0.0, 1.0, out=out)


def _adjust_hue(x: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue of a float32 RGB image in [0, 1] by ``shift`` turns (|shift| <= 0.5; torchvision's adjust_hue)."""
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # float input: H in degrees [0, 360), S and V in [0, 1]
    h, s, v = cv2.split(hsv)  # contiguous planes: the wrap below is then two cheap passes
    h += np.float32(shift * 360.0)
    if shift < 0:
        h[h < 0] += 360.0
    else:
        h[h >= 360.0] -= 360.0
    out = cv2.cvtColor(cv2.merge((h, s, v)), cv2.COLOR_HSV2RGB)
    return np.clip(out, 0.0, 1.0, out=out)


@dataclass(frozen=True)
class ColorOps:
    """One draw of ColorJitter (+ RandomGrayscale): factors applied in ``order``; replayable.

    Same arithmetic as torchvision's ``adjust_brightness/contrast/saturation/hue`` and
    ``rgb_to_grayscale`` on float images, each op clamped to [0, 1] as there, but done with
    one OpenCV colour-matrix pass per op on an ``HxWx3`` float32 array: about ten times cheaper
    than torch on a loader worker's single core (tests/test_training_fast.py compares them).
    """

    order: tuple[str, ...] = ()
    factors: tuple[float, ...] = ()
    grayscale: bool = False

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Apply to a float32 ``HxWx3`` RGB image in [0, 1]; returns a new array."""
        x = image
        for name, f in zip(self.order, self.factors):
            if name == "brightness":
                x = _apply_affine_clamped(x, _blend_matrix(f, toward_gray=False))
            elif name == "contrast":
                # Blend toward the mean grey level of the whole (current) image.
                mean_gray = float(np.dot(GRAY_WEIGHTS, cv2.mean(x)[:3]))
                x = _apply_affine_clamped(x, _blend_matrix(f, toward_gray=False), (1.0 - f) * mean_gray)
            elif name == "saturation":
                x = _apply_affine_clamped(x, _blend_matrix(f, toward_gray=True))
            else:
                x = _adjust_hue(x, f)
        if self.grayscale:
            x = _apply_affine_clamped(x, np.outer(np.ones(3), GRAY_WEIGHTS))
        return x


def sample_color(rng: np.random.Generator, brightness: float = 0.0, contrast: float = 0.0,
                 saturation: float = 0.0, hue: float = 0.0, grayscale_p: float = 0.0) -> ColorOps:
    """Draw ColorJitter(brightness, contrast, saturation, hue) factors in a random order, as torchvision."""
    ranges = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}
    names = [n for n in ("brightness", "contrast", "saturation", "hue") if ranges[n] > 0]
    order = [names[i] for i in rng.permutation(len(names))]
    factors = [rng.uniform(-ranges[n], ranges[n]) if n == "hue" else rng.uniform(1 - ranges[n], 1 + ranges[n])
               for n in order]
    gray = bool(grayscale_p > 0 and rng.random() < grayscale_p)
    return ColorOps(tuple(order), tuple(float(f) for f in factors), gray)


def to_float_rgb(image: np.ndarray) -> np.ndarray:
    """RGB uint8 ``HxWx3`` -> float32 ``HxWx3`` in [0, 1] (what :class:`ColorOps` works on)."""
    return image.astype(np.float32) * np.float32(1.0 / 255.0)


# ----------------------------------------------------------------------------------------------- thin-plate spline

def _tps_kernel(r2: np.ndarray) -> np.ndarray:
    # U(r) = r^2 log r^2, with U(0) = 0.
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r2 > 0, r2 * np.log(r2), 0.0)


@dataclass(frozen=True)
class TPSWarp:
    """A thin-plate-spline deformation of an ``(h, w)`` image, as a backward map.

    ``map_x``/``map_y`` (float32, ``(h, w)``) give for each output pixel centre the source
    pixel-centre coordinate to sample (cv2.remap convention), so that image and mask are sampled
    from the SAME positions and stay aligned.
    """

    map_x: np.ndarray
    map_y: np.ndarray

    def image(self, image: np.ndarray, interpolation: str = "bicubic",
              fill: tuple[int, int, int] = IM_MEAN_255) -> np.ndarray:
        return cv2.remap(image, self.map_x, self.map_y, _INTERP[interpolation],
                         borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(int(c) for c in fill))

    def labels(self, labels: np.ndarray) -> np.ndarray:
        return cv2.remap(labels, self.map_x, self.map_y, cv2.INTER_NEAREST,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    def _displacement(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bilinear ``source - output`` displacement at output edge coordinates ``(x, y)``."""
        h, w = self.map_x.shape
        cx, cy = np.clip(x - 0.5, 0, w - 1), np.clip(y - 0.5, 0, h - 1)
        x0, y0 = np.minimum(np.floor(cx).astype(int), w - 2), np.minimum(np.floor(cy).astype(int), h - 2)
        x0, y0 = np.maximum(x0, 0), np.maximum(y0, 0)
        fx, fy = cx - x0, cy - y0
        x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
        out = []
        for field, base in ((self.map_x, np.arange(w)[None, :]), (self.map_y, np.arange(h)[:, None])):
            d = field - base  # displacement at each pixel centre
            top = d[y0, x0] * (1 - fx) + d[y0, x1] * fx
            bottom = d[y1, x0] * (1 - fx) + d[y1, x1] * fx
            out.append(top * (1 - fy) + bottom * fy)
        return out[0], out[1]

    def boxes(self, boxes: np.ndarray, points_per_side: int = 5) -> np.ndarray:
        """Move boxes forward through the warp: enclosing box of points along each moved edge.

        The field is a backward map (output ``p`` samples source ``p + d(p)``), so a source point
        ``q`` lands where ``p + d(p) = q``; a few fixed-point steps ``p <- q - d(p)`` solve it for
        the small, smooth displacements used here.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if not len(boxes):
            return boxes
        s = np.linspace(0, 1, points_per_side)
        x1, y1, x2, y2 = (boxes[:, i:i + 1] for i in range(4))
        xs = np.concatenate([x1 + (x2 - x1) * s, x1 + (x2 - x1) * s, np.repeat(x1, len(s), 1), np.repeat(x2, len(s), 1)], 1)
        ys = np.concatenate([np.repeat(y1, len(s), 1), np.repeat(y2, len(s), 1), y1 + (y2 - y1) * s, y1 + (y2 - y1) * s], 1)
        px, py = xs.copy(), ys.copy()
        for _ in range(4):
            dx, dy = self._displacement(px, py)
            px, py = xs - dx, ys - dy
        return np.stack([px.min(1), py.min(1), px.max(1), py.max(1)], axis=1)


def random_tps(rng: np.random.Generator, size: tuple[int, int], num_points: int = 12,
               sigma: float = 0.02) -> TPSWarp:
    """Random TPS warp: ``num_points`` control points moved by N(0, sigma * side) (upstream: 12, 0.02).

    The spline interpolates the control displacements and is solved exactly (kernel + affine
    part); the four image corners are added as fixed points so that the warp stays local and
    does not drift the whole frame.
    """
    h, w = size
    pts = rng.uniform(0, 1, size=(num_points, 2))
    disp = rng.normal(0, sigma, size=(num_points, 2))
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ctrl = np.concatenate([pts, corners])
    vals = np.concatenate([disp, np.zeros((4, 2))])
    n = len(ctrl)
    k = _tps_kernel(((ctrl[:, None] - ctrl[None]) ** 2).sum(-1))
    p = np.concatenate([np.ones((n, 1)), ctrl], 1)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = k + 1e-8 * np.eye(n)
    system[:n, n:] = p
    system[n:, :n] = p.T
    rhs = np.zeros((n + 3, 2))
    rhs[:n] = vals
    coef = np.linalg.solve(system, rhs)
    # Evaluate on a coarse grid and upsample: the field is smooth, and this keeps it cheap at 384^2.
    gh, gw = min(h, 48), min(w, 48)
    gy, gx = np.meshgrid((np.arange(gh) + 0.5) / gh, (np.arange(gw) + 0.5) / gw, indexing="ij")
    q = np.stack([gx.ravel(), gy.ravel()], 1)
    u = _tps_kernel(((q[:, None] - ctrl[None]) ** 2).sum(-1))
    field = u @ coef[:n] + np.concatenate([np.ones((len(q), 1)), q], 1) @ coef[n:]
    dx = cv2.resize(field[:, 0].reshape(gh, gw).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    dy = cv2.resize(field[:, 1].reshape(gh, gw).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    return TPSWarp(xx + dx * w, yy + dy * h)


# ----------------------------------------------------------------------------------------------- second view

def random_second_view(rng: np.random.Generator, size: int, side_scale: tuple[float, float] = (0.5, 1.0),
                       flip_p: float = 0.5) -> Matrix:
    """View-1 -> view-2 map of PCL's cross-view anchor: a square crop + optional flip, resized back.

    The crop side is ``uniform(side_scale) * size`` at a uniform position inside view 1, so
    view 2 never shows anything that view 1 does not.
    """
    side = rng.uniform(*side_scale) * size
    x0, y0 = rng.uniform(0, size - side), rng.uniform(0, size - side)
    g = resized_crop(x0, y0, side, side, size, size)
    if rng.random() < flip_p:
        g = hflip(size) @ g
    return g


def grid_theta(view1_to_view2: Matrix, size: tuple[int, int]) -> np.ndarray:
    """``F.affine_grid`` theta (2x3) that resamples view-1 tensors into view-2 geometry.

    For an output location ``u2`` of view 2 in normalised coordinates (``align_corners=False``:
    -1 and +1 are the outer edges of the border pixels, ``u = 2 x / W - 1`` in edge coordinates),
    ``theta @ [u2, 1]`` is the normalised view-1 location showing the same scene point. Hence
    ``grid_sample(v1, affine_grid(theta, v2_shape, align_corners=False), align_corners=False)``
    gives view 2 at any resolution (image or stride-16 features alike, as both views share
    ``size``).
    """
    h, w = size
    norm = np.array([[2.0 / w, 0.0, -1.0], [0.0, 2.0 / h, -1.0], [0.0, 0.0, 1.0]])
    theta = norm @ np.linalg.inv(view1_to_view2) @ np.linalg.inv(norm)
    return theta[:2]
