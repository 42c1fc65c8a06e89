"""Label masks: DAVIS palette PNGs, DAVIS-2016 0/255 masks, user masks in any PNG mode, and their checks.

A label map is a ``HxW`` uint8 array: 0 = background, 1..K = objects.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from corrvos.errors import InputError

PathLike = str | os.PathLike

MAX_OBJECTS = 255


def davis_palette() -> np.ndarray:
    """The 256-colour DAVIS/PASCAL-VOC palette as a ``256x3`` uint8 array (1 = (128, 0, 0), 2 = (0, 128, 0), ...).

    Colour of index i: the bits of i are dealt round-robin to red, green and blue (bit 0 to red,
    bit 1 to green, bit 2 to blue, bit 3 to red again...), each channel filling from its most
    significant bit downwards, so low indices get far-apart colours.
    """
    idx = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.int64)
    for level in range(8):              # 8 bits per channel; each round consumes 3 bits of the index
        for channel in range(3):
            bit = (idx >> (3 * level + channel)) & 1
            palette[:, channel] |= bit << (7 - level)
    return palette.astype(np.uint8)


PALETTE = davis_palette()


def colorize(labels: np.ndarray) -> np.ndarray:
    """Label map -> RGB uint8 image in palette colours."""
    return PALETTE[np.asarray(labels, dtype=np.uint8)]


# ----------------------------------------------------------------------------------------------- reading

def labels_from_gray(gray: np.ndarray) -> np.ndarray:
    """Grayscale mask -> labels.

    0/255 masks (DAVIS-2016) and other bright masks (anti-aliased or JPEG-saved binary masks) are
    thresholded at 127 into one object; images whose values are all below 128 are already label maps.
    """
    gray = np.asarray(gray)
    if gray.size and gray.max() < 128:
        return gray.astype(np.uint8)
    return (gray > 127).astype(np.uint8)


def labels_from_rgb(rgb: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    """RGB(A) mask -> labels: each distinct non-black colour becomes an object.

    Ids are consecutive: DAVIS palette colours come first in palette order (so a mask drawn in the
    palette keeps its object order), then other colours in lexicographic RGB order. Fully transparent
    pixels are background.
    """
    rgb = np.asarray(rgb, dtype=np.uint8)[..., :3]
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        gray = rgb[..., 0].copy()
        if alpha is not None:
            gray[alpha == 0] = 0
        return labels_from_gray(gray)
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    if alpha is not None:
        code = np.where(alpha == 0, 0, code)
    colours = np.unique(code)
    colours = colours[colours != 0]
    if len(colours) > MAX_OBJECTS:
        raise InputError(
            f"the mask has {len(colours)} distinct colours, too many to be object labels (probably a lossy or "
            "anti-aliased image); save it as a palette or grayscale PNG with one flat colour per object."
        )
    pal = PALETTE.astype(np.int64)
    pal_codes = {int((r << 16) | (g << 8) | b): i for i, (r, g, b) in enumerate(pal) if i}
    ordered = sorted(colours.tolist(), key=lambda c: (0, pal_codes[c]) if c in pal_codes else (1, c))
    lut_keys = np.array(ordered, dtype=np.int64)
    labels = np.zeros(code.shape, dtype=np.uint8)
    if len(lut_keys):
        # colours are unique, so searchsorted over the sorted codes finds each pixel's colour exactly.
        order = np.argsort(lut_keys)
        pos = np.searchsorted(lut_keys[order], code)
        pos = np.clip(pos, 0, len(lut_keys) - 1)
        ids = (order[pos] + 1).astype(np.uint8)
        labels = np.where(code != 0, ids, 0).astype(np.uint8)
    return labels


def read_mask(path: PathLike) -> np.ndarray:
    """Read a mask image as a uint8 label map.

    Palette PNGs give their indices; grayscale masks go through :func:`labels_from_gray`
    (DAVIS-2016 0/255 -> 0/1); RGB(A) images through :func:`labels_from_rgb`.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"the mask file {path} does not exist; check the path.")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode == "P":
                if "transparency" in img.info and not isinstance(img.info["transparency"], int):
                    img = img.convert("RGBA")  # per-entry alpha: the colours, not the indices, carry meaning
                    mode = "RGBA"
                else:
                    return np.asarray(img, dtype=np.uint8).copy()
            if mode in ("1", "L", "I", "I;16", "F"):
                return labels_from_gray(np.asarray(img.convert("L") if mode in ("1", "F") else img))
            if mode == "LA":
                arr = np.asarray(img)
                gray = arr[..., 0].copy()
                gray[arr[..., 1] == 0] = 0
                return labels_from_gray(gray)
            arr = np.asarray(img.convert("RGBA"))
            return labels_from_rgb(arr[..., :3], arr[..., 3])
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"could not read the mask {path} as an image; give a PNG mask.") from err


# ----------------------------------------------------------------------------------------------- writing

def palette_image(labels: np.ndarray):
    """Label map -> PIL palette image carrying the DAVIS palette."""
    from PIL import Image

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected a HxW label map, got shape {labels.shape}")
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ValueError("labels must lie in 0..255 to be written as a palette PNG")
        labels = labels.astype(np.uint8)
    # frombytes keeps the raw indices; converting an "L" image to "P" would re-quantise them.
    img = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels).tobytes())
    img.putpalette(PALETTE.tobytes())
    return img


def _write_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` through a temp file and a rename: a reader never sees half a PNG."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_mask(path: PathLike, labels: np.ndarray) -> Path:
    """Write a label map as a DAVIS palette PNG, atomically; returns the path."""
    buf = io.BytesIO()
    palette_image(labels).save(buf, format="PNG", optimize=False)
    return _write_atomic(path, buf.getvalue())


def matte_png(alpha: np.ndarray) -> bytes:
    """A ``HxW`` uint8 matte (0 = outside the object, 255 = inside) as greyscale PNG bytes."""
    from PIL import Image

    alpha = np.asarray(alpha)
    if alpha.ndim != 2 or alpha.dtype != np.uint8:
        raise ValueError(f"expected a HxW uint8 matte, got {alpha.dtype} of shape {alpha.shape}")
    buf = io.BytesIO()
    Image.fromarray(alpha, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_matte(path: PathLike, alpha: np.ndarray) -> Path:
    """Write a matte as a greyscale PNG, atomically; returns the path."""
    return _write_atomic(path, matte_png(alpha))


# ----------------------------------------------------------------------------------------------- checks

def check_mask(mask: np.ndarray, frame_shape: tuple[int, ...], allow_empty: bool = False) -> np.ndarray:
    """Validate a first-frame label map against the frames' ``(H, W[, C])``; returns it as uint8.

    Raises InputError when the mask is not 2-D, has another size than the frames, or (unless ``allow_empty``)
    marks no object.
    """
    mask = np.asarray(mask)
    h, w = frame_shape[:2]
    if mask.ndim != 2:
        raise InputError(f"the mask must be a single-channel label map, but it has shape {mask.shape}; give a PNG mask.")
    if mask.shape != (h, w):
        mh, mw = mask.shape
        raise InputError(
            f"the mask is {mh}x{mw} (height x width) but the frames are {h}x{w}; "
            "give a mask drawn on the first frame at the frames' size."
        )
    if not allow_empty and not mask.any():
        raise InputError(
            "the first-frame mask has no object pixels (it is all background); mark at least one object on it."
        )
    return mask.astype(np.uint8, copy=False)


def read_given_masks(path: Path, names: Sequence[str], size: tuple[int, int],
                     allow_empty: bool = False) -> dict[int, np.ndarray]:
    """One PNG for frame 0, or a folder of PNGs named after the frames they annotate -> {t: labels}.

    ``allow_empty`` accepts all-background masks (a training frame where the objects are out of view); an
    annotation that starts tracking must mark something.
    """
    if not path.is_dir():
        return {0: check_mask(read_mask(path), size, allow_empty)}
    files = sorted(path.glob("*.png"))
    if not files:
        raise InputError(
            f"the mask folder {path} holds no PNG files; put one mask per annotated frame there, named after its frame (e.g. 00000.png)."
        )
    index = {name: t for t, name in enumerate(names)}
    masks = {}
    for f in files:
        if f.stem not in index:
            raise InputError(
                f"the mask {f.name} in {path} names no frame of the input (its frames are {names[0]} ... {names[-1]}); "
                "name each mask after the frame it annotates."
            )
        labels = read_mask(f)
        if not allow_empty and not np.asarray(labels).any():
            raise InputError(f"the mask {f.name} in {path.name} has no object pixels; mark the objects it annotates, or remove it.")
        try:
            masks[index[f.stem]] = check_mask(labels, size, allow_empty)
        except InputError as err:
            raise InputError(f"{f.name}: {err}") from err
    return masks


def compact_labels(masks: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """Renumber the object ids of ``masks`` to 1..K in the order of their ids (the Tracker's convention:
    drawing obj1 and obj3 gives K = 2); the returned 256-entry lookup table maps 1..K back to the ids."""
    ids = np.unique(np.concatenate([np.unique(m) for m in masks]))
    ids = ids[ids != 0]
    forward = np.zeros(256, np.uint8)
    forward[ids] = np.arange(1, len(ids) + 1, dtype=np.uint8)
    back = np.zeros(256, np.uint8)
    back[1:len(ids) + 1] = ids
    return [forward[m] for m in masks], back
