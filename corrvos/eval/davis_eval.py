"""Semi-supervised DAVIS evaluation of a folder of predicted masks (DAVIS-2016 and DAVIS-2017).

Follows davisvideochallenge/davis2017-evaluation (and, for DAVIS-2016, hkchengrex/davis2016-evaluation,
the script XMem/STCN report D16 numbers with):
- sequences in ImageSets order; the GT frames of a sequence are its sorted annotation PNGs, and the
  first and last are not scored (their predictions are never read);
- DAVIS-2017: objects are the labels 1..max of the first GT frame; void pixels (255) become background
  and are otherwise ignored (no void mask in the semi-supervised task, so predictions there count as
  false positives); predictions are indexed PNGs whose label k is object k (no matching);
- DAVIS-2016: one object, the 255 (or any object label) pixels of the GT;
- a prediction label above the GT's object count is an error; objects a prediction lacks score as
  empty masks (J = 0 where the GT object is present, 1 where it is absent), as zero-filling does;
- statistics per object, global numbers are means over all objects of all sequences.

Frames are scored one at a time (the official tool stacks whole sequences in float64), which changes
memory use but not a single number.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from corrvos.errors import DatasetError, InputError
from corrvos.eval.metrics import boundary_f, jaccard, object_statistics
from corrvos.io.davis import VOID_LABEL, split_sequences

YEARS = ("2016", "2017")
GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
SEQUENCE_COLUMNS = ("Sequence", "J-Mean", "F-Mean")
GLOBAL_CSV = "global_results.csv"
SEQUENCE_CSV = "per-sequence_results.csv"


# ----------------------------------------------------------------------------------------------- dataset

@dataclass
class DavisSplit:
    """One split of a DAVIS folder: the standard layout (JPEGImages/480p, Annotations/480p, ImageSets)
    or the compact copy (videos/<seq>.mp4, Annotations/480p, ImageSets/480p frame lists)."""

    root: Path
    year: str
    split: str
    sequences: list[str]
    resolution: str = "480p"

    def annotation_dir(self, seq: str) -> Path:
        return self.root / "Annotations" / self.resolution / seq

    def annotation_paths(self, seq: str) -> list[Path]:
        """Sorted GT PNGs of a sequence (file names are the frame ids)."""
        folder = self.annotation_dir(seq)
        paths = sorted(folder.glob("*.png")) if folder.is_dir() else []
        if not paths:
            raise DatasetError(
                f"sequence {seq!r} has no annotation PNGs in {folder}; check --davis points at a complete DAVIS folder."
            )
        return paths

    def frames(self, seq: str) -> Sequence[np.ndarray]:
        """The RGB frames of a sequence (lazy): JPEGImages/<res>/<seq>/ or videos/<seq>.mp4."""
        from corrvos.io.video import ImageFolderFrames, VideoFrames

        folder = self.root / "JPEGImages" / self.resolution / seq
        if folder.is_dir():
            return ImageFolderFrames(folder)
        video = self.root / "videos" / f"{seq}.mp4"
        if video.is_file():
            return VideoFrames(video)
        raise DatasetError(
            f"no frames for sequence {seq!r}: neither {folder} nor {video} exists; check --davis."
        )

    def first_mask(self, seq: str) -> np.ndarray:
        """Labels of the first GT frame as the tracker gets them (void -> background; D16: 0/1)."""
        return read_gt_labels(self.annotation_paths(seq)[0], self.year)


def _sequences_from_imagesets(root: Path, year: str, split: str) -> list[str]:
    # File order (alphabetical in the official files) is kept so the CSV rows come out in the official order.
    names = split_sequences(root, split, (year,))
    if names is not None:
        return names
    names_file = root / "ImageSets" / year / f"{split}.txt"
    frame_list = root / "ImageSets" / "480p" / f"{split}.txt"
    raise DatasetError(
        f"no sequence list for the {split!r} split of DAVIS-{year} in {root} (looked for {names_file}"
        + (f" and {frame_list}" if year == "2016" else "")
        + "); check --davis, --split and --year."
    )


def detect_year(root: Path) -> str:
    """2017 when the folder has ImageSets/2017, else 2016 when it looks like DAVIS-2016 (frame lists or videos)."""
    if (root / "ImageSets" / "2017").is_dir():
        return "2017"
    if (root / "ImageSets" / "2016").is_dir() or (root / "ImageSets" / "480p").is_dir() or (root / "videos").is_dir():
        return "2016"
    raise DatasetError(
        f"{root} is not a DAVIS folder (no ImageSets/2016, ImageSets/2017 or ImageSets/480p); check --davis."
    )


def open_davis(
    root: str | os.PathLike,
    split: str = "val",
    year: str | None = None,
    sequences: Iterable[str] | None = None,
) -> DavisSplit:
    """Open a DAVIS folder; ``sequences`` restricts (and orders) the evaluated sequences."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"the DAVIS folder {root} does not exist; give --davis the folder holding Annotations/.")
    year = str(year) if year is not None else detect_year(root)
    if year not in YEARS:
        raise DatasetError(f"unknown DAVIS year {year!r}; use 2016 or 2017.")
    available = _sequences_from_imagesets(root, year, split)
    if sequences is not None:
        wanted = list(sequences)
        missing = [s for s in wanted if s not in available]
        if missing:
            raise DatasetError(
                f"sequence {missing[0]!r} is not in the DAVIS-{year} {split} split of {root}; pick names from "
                f"ImageSets (for example {available[0]!r})."
            )
        available = wanted
    if not (root / "Annotations").is_dir():
        raise DatasetError(f"{root} has no Annotations folder; give --davis the DAVIS root folder.")
    return DavisSplit(root=root, year=year, split=split, sequences=available)


# ----------------------------------------------------------------------------------------------- masks

def _read_indexed_png(path: Path, what: str) -> tuple[np.ndarray, str]:
    """Raw pixel values of a palette or grayscale PNG (exactly what ``np.array(Image.open(p))`` gives)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.array(img)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"could not read the {what} {path} as a PNG; rewrite it as an indexed palette PNG.") from err
    if arr.ndim != 2:
        raise InputError(
            f"the {what} {path} is an {mode} colour image; write masks as indexed palette PNGs (label k = object k)."
        )
    return arr, mode


def read_gt_labels(path: Path, year: str) -> np.ndarray:
    """A GT annotation as uint8 labels: DAVIS-2017 void (255) -> 0; DAVIS-2016 -> one object (0/1).

    DAVIS-2016 files are 8-bit 0/255 grayscale, where 255 is the object, not void. A palette
    (DAVIS-2017 style) annotation read as DAVIS-2016 merges its objects into one, void excluded,
    which is what the DAVIS-2016 evaluation of a DAVIS-2017 folder does.
    """
    arr, mode = _read_indexed_png(path, "annotation")
    if year == "2016":
        if mode == "P":
            return ((arr > 0) & (arr != VOID_LABEL)).astype(np.uint8)
        return (arr > 127).astype(np.uint8)
    labels = arr.astype(np.uint8)
    labels[arr == VOID_LABEL] = 0
    return labels


def read_prediction(path: Path, year: str, n_objects: int, shape: tuple[int, int], seq: str) -> np.ndarray:
    """A predicted mask as uint8 labels 0..n_objects, with one-sentence errors for everything unusable."""
    if not path.is_file():
        raise InputError(
            f"the prediction {path} is missing (sequence {seq!r}, frame {path.stem}); "
            "write one PNG per annotated frame."
        )
    arr, _ = _read_indexed_png(path, "prediction")
    if arr.shape != tuple(shape):
        raise InputError(
            f"the prediction {path} is {arr.shape[0]}x{arr.shape[1]} (height x width) but the annotation is "
            f"{shape[0]}x{shape[1]}; write masks at the annotation size."
        )
    if year == "2016":
        values = set(np.unique(arr).tolist())
        # DAVIS-2016 results are written either as 0/1 palette PNGs or as 0/255 grayscale masks.
        if values - {0, 1, 255} or {1, 255} <= values:
            raise InputError(
                f"the prediction {path} has labels {sorted(values)} but DAVIS-2016 has one object; "
                "write 0/1 (or 0/255) masks."
            )
        return (arr > 0).astype(np.uint8)
    top = int(arr.max()) if arr.size else 0
    if top > n_objects:
        raise InputError(
            f"the prediction {path} has label {top} but sequence {seq!r} has only {n_objects} object(s) in its "
            "first annotation; remove the extra objects (labels must match the GT's object ids)."
        )
    return arr.astype(np.uint8)


# ----------------------------------------------------------------------------------------------- results

@dataclass
class ObjectResult:
    """Per-frame J and F of one object of one sequence (scored frames only) and their statistics."""

    sequence: str
    object_id: int
    frame_ids: list[str]
    j: np.ndarray
    f: np.ndarray
    j_stats: tuple[float, float, float] = field(init=False)
    f_stats: tuple[float, float, float] = field(init=False)

    def __post_init__(self) -> None:
        self.j_stats = object_statistics(self.j)
        self.f_stats = object_statistics(self.f)

    @property
    def name(self) -> str:
        return f"{self.sequence}_{self.object_id}"


@dataclass
class EvalResult:
    """All objects of an evaluation, in sequence order then object id."""

    objects: list[ObjectResult]
    seconds: float = 0.0

    def global_scores(self) -> dict[str, float]:
        """The official global row: object-weighted means of the per-object statistics."""
        if not self.objects:
            return {name: math.nan for name in GLOBAL_COLUMNS}
        j = np.array([o.j_stats for o in self.objects], dtype=np.float64)
        f = np.array([o.f_stats for o in self.objects], dtype=np.float64)
        j_mean, f_mean = np.mean(j[:, 0]), np.mean(f[:, 0])
        row = [
            (j_mean + f_mean) / 2.0, j_mean, np.mean(j[:, 1]), np.mean(j[:, 2]),
            f_mean, np.mean(f[:, 1]), np.mean(f[:, 2]),
        ]
        return {name: float(v) for name, v in zip(GLOBAL_COLUMNS, row)}

    def sequence_rows(self) -> list[tuple[str, float, float]]:
        return [(o.name, o.j_stats[0], o.f_stats[0]) for o in self.objects]


def evaluate_sequence(split: DavisSplit, seq: str, results_dir: Path) -> list[ObjectResult]:
    """Score one sequence's predictions (``results_dir/<seq>/<frame id>.png``) against its GT."""
    gt_paths = split.annotation_paths(seq)
    first = read_gt_labels(gt_paths[0], split.year)
    # The object set is fixed by the first annotation, as in the official semi-supervised task;
    # DAVIS-2016 always has exactly one object.
    n_objects = 1 if split.year == "2016" else int(first.max())
    scored = gt_paths[1:-1]
    frame_ids = [p.stem for p in scored]
    j = np.zeros((n_objects, len(scored)), dtype=np.float64)
    f = np.zeros((n_objects, len(scored)), dtype=np.float64)
    seq_dir = results_dir / seq
    if scored and not seq_dir.is_dir():
        raise InputError(f"the results folder has no predictions for sequence {seq!r} (expected {seq_dir}/).")
    for t, gt_path in enumerate(scored):
        gt = read_gt_labels(gt_path, split.year)
        pred = read_prediction(seq_dir / f"{gt_path.stem}.png", split.year, n_objects, gt.shape, seq)
        for k in range(1, n_objects + 1):
            gt_k, pred_k = gt == k, pred == k
            j[k - 1, t] = jaccard(gt_k, pred_k)
            f[k - 1, t] = boundary_f(gt_k, pred_k)
    return [ObjectResult(seq, k + 1, frame_ids, j[k], f[k]) for k in range(n_objects)]


def _evaluate_one(args: tuple[DavisSplit, str, Path]) -> list[ObjectResult]:
    return evaluate_sequence(*args)


def evaluate_results(
    split: DavisSplit,
    results_dir: str | os.PathLike,
    workers: int = 1,
    progress: bool = True,
) -> EvalResult:
    """Evaluate every sequence of ``split``; ``workers > 1`` scores sequences in parallel processes."""
    from tqdm import tqdm

    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise InputError(f"the results folder {results_dir} does not exist; give --results the folder of <seq>/ PNGs.")
    start = time.perf_counter()
    jobs = [(split, seq, results_dir) for seq in split.sequences]
    bar = dict(total=len(jobs), desc="evaluating", unit="seq", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            per_seq = list(tqdm(pool.map(_evaluate_one, jobs), **bar))
    else:
        per_seq = [_evaluate_one(job) for job in tqdm(jobs, **bar)]
    objects = [o for seq_objects in per_seq for o in seq_objects]
    return EvalResult(objects, seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------- output

def _fmt(value: float) -> str:
    # pandas' to_csv(float_format="%.3f") as the official script uses: NaN becomes an empty field.
    return "" if math.isnan(value) else f"{value:.3f}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csvs(result: EvalResult, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``global_results.csv`` and ``per-sequence_results.csv`` in the official format (3 decimals).

    Unlike the official script, existing CSVs are overwritten, never reused: stale numbers from an
    earlier run of another model are a worse failure than re-scoring.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = result.global_scores()
    global_text = ",".join(GLOBAL_COLUMNS) + "\n" + ",".join(_fmt(scores[c]) for c in GLOBAL_COLUMNS) + "\n"
    seq_lines = [",".join(SEQUENCE_COLUMNS)]
    seq_lines += [f"{name},{_fmt(jm)},{_fmt(fm)}" for name, jm, fm in result.sequence_rows()]
    global_path, seq_path = out_dir / GLOBAL_CSV, out_dir / SEQUENCE_CSV
    _atomic_write(global_path, global_text)
    _atomic_write(seq_path, "\n".join(seq_lines) + "\n")
    return global_path, seq_path


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [" ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += [" ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def format_tables(result: EvalResult, split_name: str) -> str:
    """The global and per-object tables as the official script prints them."""
    scores = result.global_scores()
    text = f"--------------------------- Global results for {split_name} ---------------------------\n"
    text += _table(GLOBAL_COLUMNS, [[_fmt(scores[c]) for c in GLOBAL_COLUMNS]])
    text += f"\n\n---------- Per sequence results for {split_name} ----------\n"
    text += _table(SEQUENCE_COLUMNS, [[n, _fmt(jm), _fmt(fm)] for n, jm, fm in result.sequence_rows()])
    return text
