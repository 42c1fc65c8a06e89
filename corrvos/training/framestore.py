"""Training frames decoded once: every annotated frame and label map of a dataset as uint8 ``.npy`` files.

Decoding dominates a training sample's cost when frames come from JPEG files or video (about
5 ms per 480p frame), and a clip re-reads the same frames many times. ``FrameStore`` decodes each
sequence once into ``FOLDER/<seq>.rgb.npy`` (``n x H x W x 3`` uint8) and ``FOLDER/<seq>.labels.npy``
(``n x H x W`` uint8, as ``io.davis.read_annotation`` returns them) and memory-maps them: every loader
worker and every training process on the machine then shares one copy through the page cache,
and a frame costs a memory read. DAVIS-2016 train (2079 frames at 480x854) takes 3.4 GB.

    store = FrameStore.open_or_build("../shared/data/davis2016", "/tmp/d16-frames", workers=8)
    VideoClips(store, cfg, proposals=...)      # or StaticClips.from_store(store, ...)

The compact DAVIS-2016 copy (``videos/<seq>.mp4``) is decoded straight from the video, without
the JPEG round trip of ``layouts.unpack_compact``. ``short_side`` stores frames resized to that
short side (INTER_AREA; labels nearest) for crops that never need the full resolution; the
augmentation draws are relative to the frame size, so only the resampled pixels change.
Each sequence's files are written atomically (tmp + rename) and ``index.json`` last, so an
interrupted build resumes where it stopped and a complete index always names complete files.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from corrvos.errors import DatasetError
from corrvos.io.davis import read_annotation
from corrvos.training.layouts import (_requested, compact_names, find_sequences, is_compact,
                                      read_rgb)

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
PathLike = str | os.PathLike


@dataclass(frozen=True)
class StoredSequence:
    """A sequence of a :class:`FrameStore`: row ``i`` of its arrays is frame ``keys[i]``."""

    name: str
    keys: tuple[str, ...]
    skip_divisor: int = 1

    def __len__(self) -> int:
        return len(self.keys)


def shrink_to_short_side(rgb: np.ndarray, labels: np.ndarray, short_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Frame and label map with the shorter side at most ``short_side`` (None: unchanged); never enlarged.
    Area averaging for the frame; nearest for the labels, which must stay labels."""
    import cv2

    h, w = labels.shape
    if short_side is None or min(h, w) <= short_side:
        return rgb, labels
    r = short_side / min(h, w)
    size = (max(1, round(w * r)), max(1, round(h * r)))
    return (cv2.resize(rgb, size, interpolation=cv2.INTER_AREA),
            cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST))


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _decode_compact(root: Path, name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    from corrvos.io.video import read_video

    masks = sorted((root / "Annotations" / "480p" / name).glob("*.png"))
    video = root / "videos" / f"{name}.mp4"
    if not video.is_file() or not masks:
        raise DatasetError(f"The compact copy {root} has no video or masks for sequence {name!r}.")
    frames = read_video(video)
    rows = [int(p.stem) for p in masks]
    if max(rows) >= len(frames):
        raise DatasetError(f"{video} has {len(frames)} frames but a mask names frame {max(rows)}; "
                           "the compact copy is damaged.")
    rgb = np.stack([frames[t] for t in rows])
    labels = np.stack([read_annotation(p) for p in masks])
    return [f"{name}/{p.stem}" for p in masks], rgb, labels


def _build_one(job: tuple) -> tuple[str, list[str], int, tuple[int, ...]]:
    """Decode one sequence and write its arrays (runs in a worker process); reuse them if already done."""
    kind, root, name, frames, masks, divisor, folder, short_side = job
    folder = Path(folder)
    done = folder / f"{name}.meta.json"
    stamp = {"source": str(Path(root).resolve()), "short_side": short_side}
    if done.is_file() and (folder / f"{name}.rgb.npy").is_file() and (folder / f"{name}.labels.npy").is_file():
        meta = json.loads(done.read_text())
        if {k: meta.get(k) for k in stamp} == stamp:
            return name, meta["keys"], divisor, tuple(meta["shape"])
    if kind == "compact":
        keys, rgb, labels = _decode_compact(Path(root), name)
    else:
        keys = [f"{name}/{Path(p).stem}" for p in frames]
        rgb = np.stack([read_rgb(p) for p in frames])
        labels = np.stack([read_annotation(p) for p in masks])
    if rgb.shape[:3] != labels.shape:
        raise DatasetError(f"Sequence {name!r}: frames are {rgb.shape[1:3]} but masks are {labels.shape[1:]}; "
                           "every mask must have its frame's size.")
    if short_side is not None:
        pairs = [shrink_to_short_side(f, m, short_side) for f, m in zip(rgb, labels)]
        rgb, labels = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    _save_npy(folder / f"{name}.labels.npy", labels)
    _save_npy(folder / f"{name}.rgb.npy", rgb)
    # Written last: its presence (with a matching stamp) marks the sequence complete for a resumed build.
    tmp = done.with_name(f".{done.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({**stamp, "keys": keys, "shape": list(rgb.shape)}))
    os.replace(tmp, done)
    return name, keys, divisor, tuple(rgb.shape)


def store_folder(cache: PathLike, root: PathLike, split: str = "train") -> Path:
    """Where ``train.py --frame-cache CACHE`` keeps the decoded frames of ``root`` (one folder per dataset)."""
    import hashlib

    root = Path(root).resolve()
    return Path(cache) / f"{root.name}-{split}-{hashlib.sha1(str(root).encode()).hexdigest()[:8]}"


class FrameStore:
    """Decoded frames and label maps of a dataset's sequences, memory-mapped (see the module docstring).

    Picklable (loader workers re-open the maps lazily, so nothing is copied into them).
    """

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if not index.is_file():
            raise DatasetError(f"{self.folder} holds no decoded frames ({INDEX_NAME} is missing); build it with "
                               "FrameStore.open_or_build or train.py --frame-cache.")
        meta = json.loads(index.read_text())
        self.meta = meta
        self.sequences = [StoredSequence(s["name"], tuple(s["keys"]), int(s["skip_divisor"]))
                          for s in meta["sequences"]]
        self._arrays: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.sequences)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}

    def _array(self, index: int, what: str) -> np.ndarray:
        arr = self._arrays.get((index, what))
        if arr is None:
            path = self.folder / f"{self.sequences[index].name}.{what}.npy"
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise DatasetError(f"Cannot read the decoded frames {path} ({err}); delete {self.folder} "
                                   "to decode the data again.") from None
            self._arrays[(index, what)] = arr
        return arr

    def rgb(self, index: int) -> np.ndarray:
        """``n x H x W x 3`` uint8 frames of sequence ``index`` (read-only memory map)."""
        return self._array(index, "rgb")

    def labels(self, index: int) -> np.ndarray:
        """``n x H x W`` uint8 label maps of sequence ``index`` (read-only memory map)."""
        return self._array(index, "labels")

    def select(self, names: Sequence[str] | None) -> list[int]:
        """Indices of the named sequences (all when ``names`` is None); DatasetError for unknown names."""
        if names is None:
            return list(range(len(self.sequences)))
        where = {s.name: i for i, s in enumerate(self.sequences)}
        missing = [n for n in names if n not in where]
        if missing:
            raise DatasetError(f"Sequences {', '.join(missing[:5])} are not in the decoded frames at {self.folder}; "
                               "check the names or rebuild the store with them.")
        return [where[n] for n in names]

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.npy"))

    @classmethod
    def open_or_build(cls, root: PathLike, folder: PathLike, split: str = "train",
                      sequences: Sequence[str] | PathLike | None = None, short_side: int | None = None,
                      workers: int = 1, progress: bool = True, cache_dir: PathLike | None = None) -> "FrameStore":
        """Open the store in ``folder`` if it was built from the same data, else decode ``root`` into it.

        ``root`` is a DAVIS / YouTube-VOS folder or the compact DAVIS-2016 copy (read directly from
        its videos); ``split`` / ``sequences`` choose the sequences as ``layouts.find_sequences`` does.
        ``workers`` processes decode sequences in parallel.
        """
        root, folder = Path(root), Path(folder)
        jobs = _plan(root, folder, split, sequences, short_side, cache_dir)
        request = {"version": FORMAT_VERSION, "source": str(root.resolve()), "split": split,
                   "short_side": short_side, "names": [j[2] for j in jobs]}
        index = folder / INDEX_NAME
        if index.is_file():
            meta = json.loads(index.read_text())
            if {k: meta.get(k) for k in request} == request:
                return cls(folder)
            index.unlink()  # a different request: sequences whose stamp differs are decoded again
        folder.mkdir(parents=True, exist_ok=True)
        results = _run_jobs(jobs, workers, progress)
        meta = {**request, "sequences": [{"name": n, "keys": k, "skip_divisor": d, "shape": list(s)}
                                         for n, k, d, s in results]}
        tmp = index.with_name(f".{INDEX_NAME}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, index)
        return cls(folder)


def _plan(root: Path, folder: Path, split: str, sequences, short_side: int | None, cache_dir) -> list[tuple]:
    """One job per sequence: (kind, root, name, frame paths, mask paths, skip divisor, folder, short side)."""
    wanted = _requested(sequences)
    if is_compact(root):
        names = wanted or compact_names(root, split)
        jobs = [("compact", str(root), n, (), (), 1, str(folder), short_side) for n in names]
    else:
        seqs = find_sequences(root, split, wanted, cache_dir)
        jobs = [("files", str(root), s.name, tuple(map(str, s.frames)), tuple(map(str, s.masks)), s.skip_divisor,
                 str(folder), short_side) for s in seqs]
    if not jobs:
        raise DatasetError(f"No sequence found under {root} for split {split!r}.")
    return jobs


def _run_jobs(jobs: list, workers: int, progress: bool) -> list:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="decoding frames", unit="seq", disable=not progress)
    try:
        if workers <= 1:
            results = []
            for job in jobs:
                results.append(_build_one(job))
                bar.update(1)
            return results
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            results = []
            for r in pool.map(_build_one, jobs):
                results.append(r)
                bar.update(1)
            return results
    finally:
        bar.close()
