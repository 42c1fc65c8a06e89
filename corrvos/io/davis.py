"""DAVIS folder layout (2016 and 2017) and the compact shared DAVIS-2016 copy.

Standard layout::

    ROOT/JPEGImages/480p/<seq>/00000.jpg ...
    ROOT/Annotations/480p/<seq>/00000.png ...
    ROOT/ImageSets/2016/{train,val}.txt   (one sequence per line; DAVIS-2016 also ships ImageSets/480p/*.txt)
    ROOT/ImageSets/2017/{train,val}.txt

Compact shared copy (../shared/data/davis2016): ``videos/<seq>.mp4`` (frame i = DAVIS frame %05d)
plus the original ``Annotations/480p/<seq>/%05d.png`` and ``ImageSets/480p``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from corrvos.errors import DatasetError
from corrvos.io.masks import read_mask
from corrvos.io.video import VideoFrames, natural_key

PathLike = str | os.PathLike
VOID_LABEL = 255  # DAVIS-2017 marks uncertain pixels 255; the semi-supervised protocol counts them as background


def read_split_file(path: PathLike) -> list[str]:
    """Sequence names of a split file in order of first appearance.

    Accepts one name per line (``ImageSets/2016|2017/<split>.txt``, YouTube-VOS-style lists) and the
    DAVIS-2016 frame lists (``ImageSets/480p/<split>.txt``: ``/JPEGImages/480p/<seq>/00000.jpg ...``).
    """
    names: dict[str, None] = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if parts:
            first = parts[0]
            names.setdefault(Path(first).parent.name if first.startswith("/JPEGImages/") else first, None)
    return list(names)


def split_sequences(root: PathLike, split: str, years: tuple[str, ...] = ("2017", "2016")) -> list[str] | None:
    """THE split reader: the sequences of ``ImageSets/<year>/<split>.txt`` for the first of ``years`` that has
    one, in file order; with "2016" among the years the original DAVIS-2016 frame list
    ``ImageSets/480p/<split>.txt`` counts too. None when the folder has no such list."""
    root = Path(root)
    candidates = [root / "ImageSets" / y / f"{split}.txt" for y in years]
    if "2016" in years:
        candidates.append(root / "ImageSets" / "480p" / f"{split}.txt")
    for path in candidates:
        if path.is_file():
            return read_split_file(path)
    return None


def davis_sequences(root: PathLike, split: str = "val", year: int = 2016) -> list[str]:
    """Sequence names of a DAVIS split, sorted (:func:`split_sequences` of that year); DatasetError if absent."""
    if year not in (2016, 2017):
        raise ValueError(f"year must be 2016 or 2017, not {year}")
    names = split_sequences(root, split, (str(year),))
    if names is not None:
        return sorted(names)
    listing = Path(root) / "ImageSets" / str(year) / f"{split}.txt"
    raise DatasetError(
        f"the DAVIS-{year} split list {listing} is missing; point the root at a DAVIS-{year} folder "
        "that has ImageSets/ (for the shared copy run ../shared/data/davis2016/unpack.py)."
    )


def _listed(folder: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"the DAVIS {what} folder {folder} is missing; check the dataset root and sequence name.")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in suffixes), key=lambda p: natural_key(p.name))
    if not files:
        raise DatasetError(f"the DAVIS {what} folder {folder} holds no {'/'.join(suffixes)} files; re-extract the dataset.")
    return files


def frame_paths(root: PathLike, seq: str, resolution: str = "480p") -> list[Path]:
    """Sorted frame JPEGs of one sequence in the standard layout."""
    return _listed(Path(root) / "JPEGImages" / resolution / seq, (".jpg", ".jpeg"), "frame")


def annotation_paths(root: PathLike, seq: str, resolution: str = "480p") -> list[Path]:
    """Sorted annotation PNGs of one sequence (DAVIS-2016: every frame; DAVIS-2017 val: every frame too)."""
    return _listed(Path(root) / "Annotations" / resolution / seq, (".png",), "annotation")


def read_annotation(path: PathLike) -> np.ndarray:
    """One DAVIS annotation as labels: palette indices (2017) or 0/255 -> 0/1 (2016); void (255) -> 0."""
    labels = read_mask(path)
    labels[labels == VOID_LABEL] = 0
    return labels


@dataclass
class SharedSequence:
    """One sequence of the compact shared DAVIS-2016 copy, decoded."""

    name: str
    frames: list[np.ndarray]   # RGB uint8 480x854x3
    masks: list[np.ndarray]    # uint8 labels (0/1), one per frame
    names: list[str]           # 00000, 00001, ...


def read_shared_sequence(root: PathLike, seq: str, max_frames: int | None = None) -> SharedSequence:
    """Read ``videos/<seq>.mp4`` and ``Annotations/480p/<seq>/`` of the compact shared copy.

    ``max_frames`` keeps only the first frames (handy for fast tests); the frame and mask counts must agree.
    """
    root = Path(root)
    video_path = root / "videos" / f"{seq}.mp4"
    if not video_path.is_file():
        raise DatasetError(f"the video {video_path} of sequence {seq!r} is missing; check the shared DAVIS-2016 folder.")
    masks_paths = annotation_paths(root, seq)
    video = VideoFrames(video_path)
    if len(video) != len(masks_paths):
        raise DatasetError(
            f"{video_path} has {len(video)} frames but {root / 'Annotations' / '480p' / seq} has "
            f"{len(masks_paths)} masks; the shared copy is damaged, restore it."
        )
    n = len(video) if max_frames is None else min(max_frames, len(video))
    frames = [video[t] for t in range(n)]
    masks = [read_annotation(p) for p in masks_paths[:n]]
    return SharedSequence(seq, frames, masks, [p.stem for p in masks_paths[:n]])
