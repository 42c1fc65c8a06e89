"""Plot the loss curves of a `python -m experiments.recipe run` job (its work folder or logs.tar.gz).

    .venv/bin/python scripts/plot_training_curves.py /tmp/corrvos-recipe-cpu --out docs/cpu_run3_curves.png

One row per model: the segmentation loss (bootstrapped CE, + Dice for XMem) of every arm found (baseline,
+PCL, +OCL, corr) over static pretraining then main training, the arms' L_PCL and L_OCL, and (for logs
that have it) their gradient norm before clipping, on a log scale.
Curves are smoothed with a moving average over ``--smooth`` logged rows (raw rows are too noisy at
batch 4 to compare arms by eye).
"""
from __future__ import annotations

import argparse
import csv
import io
import tarfile
from pathlib import Path

import numpy as np

from corrvos.training.stages import STAGES, parse_stage_point


def read_logs(source: Path) -> dict[str, dict[str, list[dict[str, float]]]]:
    """{arm: {stage: rows}} from a work folder (<arm>/<stage>/log.csv) or a logs.tar.gz."""
    texts: dict[tuple[str, str], str] = {}
    if source.is_dir():
        for path in source.glob("*/*/log.csv"):
            texts[(path.parent.parent.name, path.parent.name)] = path.read_text()
    else:
        with tarfile.open(source) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if len(parts) == 3 and parts[2] == "log.csv":
                    texts[(parts[0], parts[1])] = tar.extractfile(member).read().decode()
    logs: dict[str, dict[str, list[dict[str, float]]]] = {}
    for (arm, stage), text in texts.items():
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(io.StringIO(text))]
        logs.setdefault(arm, {})[stage] = rows
    return logs


def series(stages: dict[str, list[dict[str, float]]], key: str, offset_static: int) -> tuple[np.ndarray, np.ndarray]:
    """Iterations (main stage shifted after static) and values of one column."""
    xs, ys = [], []
    for stage in STAGES:
        for row in stages.get(stage, []):
            if key in row:
                xs.append(row["iteration"] + (offset_static if stage == "main" else 0))
                ys.append(row[key])
    return np.asarray(xs), np.asarray(ys)


def smooth(y: np.ndarray, n: int) -> np.ndarray:
    if n <= 1 or len(y) < n:
        return y
    kernel = np.ones(n) / n
    padded = np.concatenate([np.full(n - 1, y[0]), y])
    return np.convolve(padded, kernel, mode="valid")


def seg_loss(stages: dict[str, list[dict[str, float]]], offset: int) -> tuple[np.ndarray, np.ndarray]:
    x, ce = series(stages, "ce", offset)
    _, dice = series(stages, "dice", offset)
    return x, ce + dice if len(dice) == len(ce) else ce


ARM_STYLE = {  # variant -> (label, colour); the order is the legend's
    "baseline": ("baseline (L_seg)", "tab:blue"),
    "pcl": ("+PCL (L_seg + a L_PCL)", "tab:green"),
    "ocl": ("+OCL (L_seg + a 0.5 L_OCL)", "tab:purple"),
    "corr": ("corr (L_seg + a(L_PCL + 0.5 L_OCL))", "tab:red"),
}


def truncate(logs: dict, stop: tuple[int, int] | None) -> dict:
    """Drop the rows after ``stop`` = (stage index, iteration), e.g. to compare arms that ran for different lengths."""
    if stop is None:
        return logs
    last = stop[0]
    out = {}
    for arm, stages in logs.items():
        kept = {}
        for i, stage in enumerate(STAGES):
            if stage in stages and i <= last:
                kept[stage] = [r for r in stages[stage] if i < last or r["iteration"] <= stop[1]]
        out[arm] = kept
    return out


def plot(logs: dict, out: Path, smooth_rows: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({arm.rsplit("_", 1)[0] for arm in logs})
    has_norms = any("grad_norm" in r for stages in logs.values() for rows in stages.values() for r in rows)
    cols = 3 if has_norms else 2
    fig, axes = plt.subplots(len(models), cols, figsize=(5.5 * cols, 3.6 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        arms = [(v, logs[f"{model}_{v}"]) for v in ARM_STYLE if f"{model}_{v}" in logs]
        static_iters = int(max((r["iteration"] for _, stages in arms for r in stages.get("static", [])), default=0))
        has_main = any(stages.get("main") for _, stages in arms)
        for variant, stages in arms:
            label, colour = ARM_STYLE[variant]
            x, y = seg_loss(stages, static_iters)
            if len(x):
                row[0].plot(x, smooth(y, smooth_rows), color=colour, label=label)
            for name, style in (("pcl", "-"), ("ocl", ":")):
                x, y = series(stages, name, static_iters)
                if len(x):
                    row[1].plot(x, smooth(y, smooth_rows), color=colour, linestyle=style,
                                label=f"L_{name.upper()} ({variant} arm)")
            if has_norms:
                x, y = series(stages, "grad_norm", static_iters)
                if len(x):
                    row[2].plot(x, smooth(y, smooth_rows), color=colour, label=variant)
        row[0].set_title(f"{model}: segmentation loss" + (" (CE + Dice)" if model.startswith("xmem") else " (CE)"))
        row[1].set_title(f"{model}: correspondence losses (PCL solid, OCL dotted)")
        if has_norms:
            row[2].set_yscale("log")
            row[2].set_title(f"{model}: gradient norm before clipping")
        for ax in row:
            if static_iters and has_main:
                ax.axvline(static_iters, color="grey", linestyle="--", linewidth=0.8)
                ax.text(static_iters, ax.get_ylim()[1], " main", va="top", fontsize=8, color="grey")
            ax.set_xlabel("iteration (static pretraining, then main training)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, nargs="+",
                    help="recipe work folders or logs.tar.gz files (arms of several jobs are drawn together)")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--smooth", type=int, default=5, help="moving average over this many logged rows")
    ap.add_argument("--title", default="Training loss curves (moving average)")
    ap.add_argument("--stop-at", metavar="STAGE:ITERATION", help="leave out the rows after this point, e.g. main:1000")
    args = ap.parse_args(argv)
    logs: dict = {}
    for source in args.source:
        found = read_logs(source)
        if not found:
            ap.error(f"no <arm>/<stage>/log.csv found in {source}")
        logs.update(found)
    try:
        stop = parse_stage_point(args.stop_at) if args.stop_at else None
    except ValueError as err:
        ap.error(str(err))
    logs = truncate(logs, stop)
    plot(logs, args.out, args.smooth, args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
