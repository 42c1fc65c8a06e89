"""Training data on disk: DAVIS-2016/2017 and YouTube-VOS folder layouts and the compact DAVIS-2016 copy.

Kept free of torch so that the proposal workers (``corrvos.training.proposals``) start fast.

Layouts understood (``find_sequences``):
- DAVIS:        ``ROOT/JPEGImages/480p/<seq>/*.jpg`` + ``ROOT/Annotations/480p/<seq>/*.png``; the split comes
                from ``ImageSets/2017/<split>.txt``, ``ImageSets/2016/<split>.txt`` or the DAVIS-2016 frame list
                ``ImageSets/480p/<split>.txt`` (first one found). DAVIS-2016 masks are 0/255 greyscale (one
                object), DAVIS-2017 masks are palette PNGs (index = object id).
- YouTube-VOS:  ``ROOT/JPEGImages/<seq>/*.jpg`` + ``ROOT/Annotations/<seq>/*.png`` (ROOT is the ``train``
                folder); an optional ``ROOT/meta.json`` restricts the videos to those it lists. Frames are every
                5th frame of the source video, so the max skip is divided by 5 (``VideoSequence.skip_divisor``).
- compact:      ``ROOT/videos/<seq>.mp4`` + ``ROOT/Annotations/480p/<seq>/%05d.png`` (the shared DAVIS-2016
                copy); unpacked once to the DAVIS layout under a cache folder by ``unpack_compact``.
Only frames that have both an image and a mask are used. Frame keys are ``"<seq>/<frame stem>"``; the
proposal cache uses the same keys.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from corrvos.cache import default_cache_dir
from corrvos.errors import DatasetError
from corrvos.io.davis import read_split_file, split_sequences
from corrvos.io.video import natural_key, read_video

PathLike = str | os.PathLike
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class VideoSequence:
    name: str
    frames: tuple[Path, ...]
    masks: tuple[Path, ...]
    skip_divisor: int = 1  # 5 for YouTube-VOS, whose frames are already every 5th frame

    @property
    def keys(self) -> list[str]:
        return [f"{self.name}/{p.stem}" for p in self.frames]


def is_compact(root: PathLike) -> bool:
    root = Path(root)
    return (root / "videos").is_dir() and (root / "Annotations" / "480p").is_dir()


def read_rgb(path: PathLike) -> np.ndarray:
    """RGB uint8 ``HxWx3`` image; DatasetError when the file cannot be decoded."""
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DatasetError(f"Cannot read the training image {path}; check that the file exists and is a valid image.")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _requested(sequences: list[str] | PathLike | None) -> list[str] | None:
    if sequences is None:
        return None
    if isinstance(sequences, (str, os.PathLike)) and Path(sequences).is_file():
        return read_split_file(sequences)
    if isinstance(sequences, (str, os.PathLike)):
        raise DatasetError(f"The sequence list {sequences} does not exist; pass an existing text file or a list of names.")
    return list(sequences)


def split_names(root: Path, split: str) -> list[str] | None:
    """The split's sequence list (ImageSets/2017, 2016 or 480p), None when the folder has none."""
    return split_sequences(root, split)


def compact_names(root: Path, split: str) -> list[str]:
    """Sequences of the compact copy: the split's list, else every video it holds."""
    return split_names(root, split) or sorted(p.stem for p in (root / "videos").glob("*.mp4"))


def _pair_frames(name: str, image_dir: Path, mask_dir: Path, divisor: int) -> VideoSequence | None:
    if not image_dir.is_dir() or not mask_dir.is_dir():
        return None
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
    frames = sorted((p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.stem in masks),
                    key=lambda p: natural_key(p.name))
    if not frames:
        return None
    return VideoSequence(name, tuple(frames), tuple(masks[p.stem] for p in frames), divisor)


def find_sequences(root: PathLike, split: str = "train", sequences: list[str] | PathLike | None = None,
                   cache_dir: PathLike | None = None) -> list[VideoSequence]:
    """The training sequences of a DAVIS / YouTube-VOS / compact folder (see the module docstring).

    ``sequences`` (names or a text file of names) restricts the split. A compact copy is unpacked
    once under ``cache_dir`` (default ``$CORRVOS_CACHE`` or ``~/.cache/corrvos``).
    """
    root = Path(root)
    wanted = _requested(sequences)
    if is_compact(root):
        names = wanted or compact_names(root, split)
        out = unpack_compact(root, Path(cache_dir or default_cache_dir()) / f"{root.name}-unpacked", names)
        return find_sequences(out, split, names)
    if (root / "JPEGImages" / "480p").is_dir():
        image_root, mask_root, divisor = root / "JPEGImages" / "480p", root / "Annotations" / "480p", 1
        names = wanted or split_names(root, split)
    elif (root / "JPEGImages").is_dir():
        image_root, mask_root, divisor = root / "JPEGImages", root / "Annotations", 5
        names = wanted
        if names is None and (root / "meta.json").is_file():
            names = sorted(json.loads((root / "meta.json").read_text()).get("videos", {}))
    else:
        raise DatasetError(f"{root} is not a DAVIS, YouTube-VOS or compact DAVIS folder (no JPEGImages/ or videos/); "
                           "point --data at the dataset root.")
    if names is None:
        names = sorted((p.name for p in image_root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                       key=natural_key)
    seqs = [s for n in names if (s := _pair_frames(n, image_root / n, mask_root / n, divisor)) is not None]
    missing = [n for n in names if not any(s.name == n for s in seqs)]
    if wanted is not None and missing:
        raise DatasetError(f"Sequences {', '.join(missing[:5])} have no frames with masks under {root}; "
                           "check the names or the dataset folder.")
    if not seqs:
        raise DatasetError(f"No sequence with both frames and masks found under {root} for split {split!r}.")
    return seqs


def unpack_compact(root: PathLike, out: PathLike, sequences: list[str] | None = None, quality: int = 95) -> Path:
    """Decode the compact copy's videos into ``OUT/JPEGImages/480p/<seq>/%05d.jpg`` (+ masks) once.

    Safe when several processes (DDP ranks, two trainings) unpack into the same cache at once: each
    sequence is unpacked under an exclusive per-sequence lock, into temporary folders with names unique
    to the process, and renamed into place only when complete; a process that waited for the lock finds
    the finished sequence and leaves it alone. An interrupted unpack never leaves a half-written
    sequence that a later call would trust.
    """
    root, out = Path(root), Path(out)
    names = sequences or sorted(p.stem for p in (root / "videos").glob("*.mp4"))
    for name in names:
        jdir = out / "JPEGImages" / "480p" / name
        adir = out / "Annotations" / "480p" / name
        if jdir.is_dir() and adir.is_dir():
            continue
        with _sequence_lock(out, name):
            if jdir.is_dir() and adir.is_dir():  # another process finished it while we waited
                continue
            _unpack_sequence(root, name, jdir, adir, quality)
    return out


@contextlib.contextmanager
def _sequence_lock(out: Path, name: str):
    """Exclusive lock of one sequence of the cache, shared by every process on this machine."""
    lock_dir = out / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a+") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: the unique temporary names below still keep writers apart
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _unpack_sequence(root: Path, name: str, jdir: Path, adir: Path, quality: int) -> None:
    import cv2

    video = root / "videos" / f"{name}.mp4"
    masks = sorted((root / "Annotations" / "480p" / name).glob("*.png"))
    if not video.is_file() or not masks:
        raise DatasetError(f"The compact copy {root} has no video or masks for sequence {name!r}.")
    frames = read_video(video)
    if len(frames) != len(masks):
        raise DatasetError(f"{video} has {len(frames)} frames but {len(masks)} masks; the compact copy is damaged.")
    for final, write in ((jdir, "frames"), (adir, "masks")):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            if write == "frames":
                for t, rgb in enumerate(frames):
                    cv2.imwrite(str(tmp / f"{t:05d}.jpg"), rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
            else:
                for m in masks:
                    shutil.copy2(m, tmp / m.name)
            if final.exists():  # left by an interrupted run: its partner folder is missing
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def compact_frames(root: PathLike, split: str = "train", sequences: list[str] | PathLike | None = None,
                   skip: set[str] | frozenset[str] = frozenset()):
    """Yield ``(key, rgb)`` for every annotated frame of the compact copy not in ``skip``, decoding each video once."""
    root = Path(root)
    names = _requested(sequences) or compact_names(root, split)
    for name in names:
        stems = [p.stem for p in sorted((root / "Annotations" / "480p" / name).glob("*.png"))
                 if f"{name}/{p.stem}" not in skip]
        if not stems:
            continue
        frames = read_video(root / "videos" / f"{name}.mp4")
        for stem in stems:
            t = int(stem)
            if t < len(frames):
                yield f"{name}/{stem}", frames[t]


def compact_keys(root: PathLike, split: str = "train", sequences: list[str] | PathLike | None = None) -> list[str]:
    """Frame keys of the compact copy without decoding anything (the masks name the frames)."""
    root = Path(root)
    names = _requested(sequences) or compact_names(root, split)
    return [f"{n}/{p.stem}" for n in names for p in sorted((root / "Annotations" / "480p" / n).glob("*.png"))]
