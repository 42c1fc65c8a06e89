"""Paired comparison of DAVIS evaluations: is checkpoint B better than A, or is the difference noise?

    python -m corrvos.eval.compare outputs/eval/A outputs/eval/B [more...] [--names a b ...]

Each argument is a folder written by ``python -m corrvos.eval`` (or its ``per-sequence_results.csv``).
The first is the reference. Every other run is compared with it object by object (the rows of the
per-sequence file, so both runs must cover the same objects): mean J&F difference, a 95 % bootstrap
interval over objects, how many objects got better / worse, and a two-sided paired sign-flip
permutation p-value. With DAVIS-2016 val's 20 objects a difference of a few points J&F is often
inside the interval; the table says so instead of leaving it to the reader.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from corrvos.errors import InputError

PER_SEQUENCE = "per-sequence_results.csv"


@dataclass(frozen=True)
class PerObject:
    """J and F per object (rows ``<sequence>_<object id>`` of the official per-sequence file)."""

    name: str
    objects: tuple[str, ...]
    j: np.ndarray
    f: np.ndarray

    @property
    def jf(self) -> np.ndarray:
        return (self.j + self.f) / 2


@dataclass(frozen=True)
class PairedDifference:
    mean: float  # mean over objects of (other - reference) J&F
    low: float  # 95 % bootstrap interval of that mean
    high: float
    better: int  # objects whose J&F went up / down by more than 0.0005 (the files keep 3 decimals)
    worse: int
    p_value: float  # two-sided paired sign-flip permutation test


def read_per_object(path: Path, name: str | None = None) -> PerObject:
    """Read an evaluation folder or its per-sequence CSV."""
    path = Path(path)
    csv_path = path / PER_SEQUENCE if path.is_dir() else path
    if not csv_path.is_file():
        raise InputError(f"{path} has no {PER_SEQUENCE}; pass a folder written by `python -m corrvos.eval`.")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"Sequence", "J-Mean", "F-Mean"} <= set(rows[0]):
        raise InputError(f"{csv_path} is not a per-sequence results file (columns Sequence, J-Mean, F-Mean).")
    try:
        j = np.array([float(r["J-Mean"]) for r in rows])
        f = np.array([float(r["F-Mean"]) for r in rows])
    except ValueError:
        raise InputError(f"{csv_path} has a non-numeric J-Mean or F-Mean.") from None
    label = name or (path.name if path.is_dir() else path.parent.name)
    return PerObject(label, tuple(r["Sequence"] for r in rows), j, f)


def paired_difference(reference: PerObject, other: PerObject, samples: int = 20000,
                      seed: int = 0) -> PairedDifference:
    """``other`` minus ``reference`` over the same objects, with its uncertainty over objects."""
    if set(reference.objects) != set(other.objects):
        missing = sorted(set(reference.objects) ^ set(other.objects))
        raise InputError(f"{reference.name} and {other.name} cover different objects "
                         f"({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}); evaluate both on the same split.")
    order = [other.objects.index(o) for o in reference.objects]
    d = other.jf[order] - reference.jf
    rng = np.random.default_rng(seed)
    n = len(d)
    boot = d[rng.integers(0, n, size=(samples, n))].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    # Under "no difference" each object's sign is a coin flip; the observed mean counts as one draw.
    flips = rng.choice(np.array([-1.0, 1.0]), size=(samples, n))
    extreme = np.sum(np.abs((flips * d).mean(axis=1)) >= abs(d.mean()) - 1e-12)
    return PairedDifference(float(d.mean()), float(low), float(high), int(np.sum(d > 5e-4)),
                            int(np.sum(d < -5e-4)), float((extreme + 1) / (samples + 1)))


def comparison_table(runs: list[PerObject], samples: int = 20000, seed: int = 0) -> str:
    """Markdown table: every run's J&F / J / F and its paired difference with the first."""
    ref = runs[0]
    lines = [f"| run | J&F | J | F | J&F - {ref.name} | 95 % interval | objects better / worse | p |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        head = f"| {run.name} | {run.jf.mean():.3f} | {run.j.mean():.3f} | {run.f.mean():.3f} |"
        if run is ref:
            lines.append(head + " (reference) | | | |")
            continue
        d = paired_difference(ref, run, samples, seed)
        p = "< 0.001" if d.p_value < 0.001 else f"{d.p_value:.3f}"
        lines.append(head + f" {d.mean:+.3f} | [{d.low:+.3f}, {d.high:+.3f}] | {d.better} / {d.worse} | {p} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corrvos.eval.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="evaluation folders (the first is the reference)")
    ap.add_argument("--names", nargs="+", help="labels for the runs (default: the folder names)")
    ap.add_argument("--samples", type=int, default=20000, help="bootstrap and permutation samples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error("give at least two evaluation folders: the reference and one to compare with it")
    if args.names and len(args.names) != len(args.runs):
        ap.error(f"--names has {len(args.names)} labels for {len(args.runs)} runs")
    try:
        runs = [read_per_object(p, n) for p, n in zip(args.runs, args.names or [None] * len(args.runs))]
        print(comparison_table(runs, args.samples, args.seed))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
