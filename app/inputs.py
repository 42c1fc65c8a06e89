"""Turning what the UI hands over (editor layers, uploaded mask and ground-truth files) into label maps."""
from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from corrvos.errors import InputError
from corrvos.io.masks import PALETTE, check_mask, read_mask
from corrvos.io.video import natural_key

MASK_SUFFIXES = (".png",)


def labels_from_layers(layers: Sequence[np.ndarray | None] | None) -> np.ndarray | None:
    """Editor layers (one RGBA array per object, in object order) -> label map; None when nothing is drawn.

    A layer's index decides the object, not its colour, so a stroke in the "wrong" colour still lands
    on the layer's object; later layers win where strokes overlap.
    """
    if not layers:
        return None
    labels = None
    for k, layer in enumerate(layers, start=1):
        if layer is None:
            continue
        layer = np.asarray(layer)
        if labels is None:
            labels = np.zeros(layer.shape[:2], np.uint8)
        if layer.shape[:2] != labels.shape:
            raise InputError("the editor's layers have different sizes; clear the drawing and draw again.")
        drawn = layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[2] == 4 else np.asarray(layer).any(axis=-1)
        labels[drawn] = k
    if labels is None or not labels.any():
        return None
    return labels


def label_layer(labels: np.ndarray, k: int) -> np.ndarray:
    """RGBA layer showing object ``k`` of a label map in its palette colour (to pre-fill the editor)."""
    layer = np.zeros((*labels.shape, 4), np.uint8)
    inside = labels == k
    layer[inside, :3] = PALETTE[k]
    layer[inside, 3] = 255
    return layer


def first_mask(layers: Sequence[np.ndarray | None] | None, mask_file: str | None, frame_shape: tuple[int, ...]) -> np.ndarray:
    """The annotation: an uploaded mask PNG wins over drawn layers; checked against the frame size."""
    if mask_file:
        labels = read_mask(mask_file)
    else:
        labels = labels_from_layers(layers)
        if labels is None:
            raise InputError(
                "no object is marked on the annotated frame; draw each object on its own layer or upload a mask PNG."
            )
    labels = check_mask(labels, frame_shape)
    return labels


def read_ground_truth(files: Sequence[str] | str | None, names: Sequence[str], frame_shape: tuple[int, ...]) -> list[np.ndarray | None] | None:
    """Ground-truth masks from PNG files or zips of PNGs, matched to the frames by file stem, or by
    order when the stems do not match the frame names and the counts agree."""
    if not files:
        return None
    if isinstance(files, (str, Path)):
        files = [files]
    # Zip members are unpacked only for as long as it takes to read them: a long-running app must not
    # leave one folder per upload behind.
    with tempfile.TemporaryDirectory(prefix="corrvos-gt-") as tmp:
        pngs = _mask_files(files, Path(tmp))
        return _match_masks(pngs, names, frame_shape)


def _mask_files(files: Sequence[str | Path], tmp: Path) -> list[Path]:
    pngs: list[Path] = []
    for f in map(Path, files):
        if f.suffix.lower() == ".zip":
            try:
                with zipfile.ZipFile(f) as zf:
                    members = [m for m in zf.namelist() if m.lower().endswith(MASK_SUFFIXES) and not m.startswith("__MACOSX")]
                    for i, m in enumerate(members):
                        out = tmp / f"{i:06d}" / Path(m).name
                        out.parent.mkdir()
                        out.write_bytes(zf.read(m))
                        pngs.append(out)
            except zipfile.BadZipFile as err:
                raise InputError(f"the ground-truth file {f.name} is not a readable zip; give PNG masks or a zip of them.") from err
        elif f.suffix.lower() in MASK_SUFFIXES:
            pngs.append(f)
    if not pngs:
        raise InputError("the ground-truth upload holds no PNG masks; give PNG masks or a zip of them.")
    pngs.sort(key=lambda p: natural_key(p.name))
    return pngs


def _match_masks(pngs: list[Path], names: Sequence[str], frame_shape: tuple[int, ...]) -> list[np.ndarray | None]:
    by_stem = {p.stem: p for p in pngs}
    out: list[np.ndarray | None] = [None] * len(names)
    matched = [by_stem.get(n) for n in names]
    if not any(matched):
        if len(pngs) != len(names):
            raise InputError(
                f"the {len(pngs)} ground-truth masks match no frame name and their count differs from the "
                f"{len(names)} frames; name them like the frames (e.g. 00000.png)."
            )
        matched = pngs
    for t, p in enumerate(matched):
        if p is None:
            continue
        lab = read_mask(p)
        if lab.shape != tuple(frame_shape[:2]):
            raise InputError(
                f"the ground-truth mask {p.name} is {lab.shape[0]}x{lab.shape[1]} but the frames are "
                f"{frame_shape[0]}x{frame_shape[1]}; give masks at the video's size."
            )
        out[t] = lab
    return out
