"""``python -m corrvos.eval``: DAVIS J&F of a results folder, or of a checkpoint run over the split first.

    python -m corrvos.eval --davis DAVIS --split val --results RESULTS [--year 2016|2017]
    python -m corrvos.eval --davis DAVIS --split val --checkpoint model.safetensors [--out DIR] [--device cuda]

The CSVs (``global_results.csv``, ``per-sequence_results.csv``) are written into the results folder.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from corrvos.errors import CorrvosError, InputError
from corrvos.tracker_options import (
    add_size_argument, add_tracker_arguments, given_tracker_options, processing_size, run_device, tracker_options,
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m corrvos.eval",
        description="Semi-supervised DAVIS evaluation (J&F identical to the official davis2017-evaluation tool).",
    )
    ap.add_argument("--davis", required=True, type=Path,
                    help="DAVIS folder: standard layout (JPEGImages/480p, Annotations/480p, ImageSets) "
                         "or the compact copy (videos/<seq>.mp4, Annotations/480p, ImageSets/480p)")
    ap.add_argument("--split", default="val", help="split name in ImageSets (default: val)")
    ap.add_argument("--year", choices=["2016", "2017"], default=None,
                    help="DAVIS year; default: 2017 when ImageSets/2017 exists, else 2016")
    ap.add_argument("--sequences", default=None, help="comma-separated subset of the split's sequences")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--results", type=Path, help="folder of predicted palette PNGs: <seq>/<frame>.png")
    src.add_argument("--checkpoint", type=Path, help="run this model over the split first, then evaluate")
    ap.add_argument("--out", type=Path, default=None,
                    help="where --checkpoint writes its PNGs (default: outputs/eval/<checkpoint>_davis<year>_<split>)")
    ap.add_argument("--device", default=None, help="torch device for --checkpoint (default: cuda if available)")
    add_size_argument(ap, "the checkpoint's training scale, 480 for upstream files and models trained on 384 crops")
    ap.add_argument("--correspondence", action="store_true",
                    help="with --checkpoint: also report mask precision@k and cycle consistency of the affinity")
    ap.add_argument("--record", action="store_true",
                    help="with --checkpoint (.safetensors, whole split): store J&F, J, F and the size in the file's "
                         "metadata, where the app and corrvos.describe_checkpoint show them")
    ap.add_argument("--predict-only", action="store_true",
                    help="with --checkpoint: write the masks and stop, for splits scored elsewhere (DAVIS-2017 test-dev "
                         "on CodaLab, whose annotations stop at the first frame)")
    ap.add_argument("--k", type=int, default=10, help="k of mask precision@k (default 10)")
    lp = ap.add_argument_group("key space alone (correspondence-learning protocol)")
    lp.add_argument("--label-propagation", action="store_true",
                    help="with --checkpoint: propagate the first-frame labels through the model's affinity only (the "
                         "first frame and the last --context predicted frames, top-k weights, no value encoder or "
                         "decoder) and score that: how good the key space is as a correspondence")
    lp.add_argument("--context", type=int, default=None, metavar="N",
                    help="--label-propagation: recent frames read besides the first (default: 20)")
    lp.add_argument("--radius", type=int, default=None, metavar="CELLS",
                    help="--label-propagation: read only memory positions within this many stride-16 cells "
                         "(default: no limit, like the memory read)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="processes scoring sequences in parallel (default: min(4, CPUs))")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_tracker_arguments(ap)  # with --checkpoint
    return ap


def _default_out(args: argparse.Namespace, year: str) -> Path:
    suffix = "_labelprop" if args.label_propagation else ""
    return Path("outputs") / "eval" / f"{args.checkpoint.stem}_davis{year}_{args.split}{suffix}"


def _check_label_propagation(args: argparse.Namespace, changed: list[str]) -> None:
    if not args.label_propagation:
        for flag, value in (("--context", args.context), ("--radius", args.radius)):
            if value is not None:
                raise InputError(f"{flag} sets the key-space label propagation; add --label-propagation or drop it.")
        return
    if args.checkpoint is None or args.record or args.correspondence or args.predict_only:
        raise InputError("--label-propagation runs --checkpoint's key space in place of the model, so it needs "
                         "--checkpoint and excludes --record, --correspondence and --predict-only.")
    memory = [flag for flag in changed if flag not in ("--top-k", "--precision")]
    if memory:
        raise InputError(f"{memory[0]} configures the model's memory, which --label-propagation does not use; drop it.")
    if args.context is not None and args.context < 0:
        raise InputError(f"--context must be at least 0, not {args.context}.")
    if args.radius is not None and args.radius < 0:
        raise InputError(f"--radius must be at least 0, not {args.radius}.")


def run(args: argparse.Namespace) -> int:
    from corrvos.eval.davis_eval import evaluate_results, format_tables, open_davis, write_csvs

    if args.record and (args.checkpoint is None or args.sequences):
        raise InputError("--record needs --checkpoint and the whole split (no --sequences): "
                         "a recorded score must be the benchmark's.")
    if args.record and args.checkpoint.suffix != ".safetensors":
        raise InputError(f"--record writes into corrvos .safetensors files; {args.checkpoint.name} is not one.")
    changed = given_tracker_options(args)
    if changed and args.checkpoint is None:
        raise InputError(f"{changed[0]} sets how a model is run, so it needs --checkpoint; drop it to score --results.")
    if changed and args.record:
        raise InputError(f"--record stores the scores of the default memory settings; drop {changed[0]} or --record.")
    if args.predict_only and (args.checkpoint is None or args.record or args.correspondence):
        raise InputError("--predict-only runs --checkpoint and scores nothing, so it needs --checkpoint and "
                         "excludes --record and --correspondence.")
    _check_label_propagation(args, changed)
    tracker_options(args)  # value errors before the dataset is opened
    start = time.perf_counter()
    sequences = [s.strip() for s in args.sequences.split(",") if s.strip()] if args.sequences else None
    split = open_davis(args.davis, args.split, args.year, sequences)
    progress = not args.no_progress
    run_stats = corr = size = None
    if args.checkpoint is not None:
        results_dir = args.out or _default_out(args, split.year)
        run_stats, corr, size = _run_model(args, split, results_dir, progress)
    else:
        if args.correspondence:
            raise InputError("--correspondence needs --checkpoint (it measures the model's own affinity); add one.")
        results_dir = args.results
    if args.predict_only:
        print(f"Wrote the masks of {run_stats.sequences} sequences to {results_dir}: {run_stats.frames} frames at "
              f"{run_stats.fps:.2f} FPS (amortised, I/O excluded); not scored (--predict-only).")
        return 0
    result = evaluate_results(split, results_dir, workers=args.workers, progress=progress)
    global_csv, seq_csv = write_csvs(result, results_dir)
    print(format_tables(result, args.split))
    print(f"\nGlobal results saved in {global_csv}\nPer-sequence results saved in {seq_csv}")
    if run_stats is not None:
        print(f"\nSegmentation: {run_stats.frames} frames of {run_stats.sequences} sequences in "
              f"{run_stats.model_seconds:.2f} s of model time: {run_stats.fps:.2f} FPS (amortised, I/O excluded)")
    if corr is not None:
        print("\n" + corr.format_table())
    if args.record:
        from corrvos.models.provenance import record_scores

        g = result.global_scores()
        benchmark = f"DAVIS-{split.year} {args.split}"
        # Six digits: a value rounded to four and then shown with three can differ from the table above
        # (0.50955 -> 0.5095 -> "0.509" where the table says 0.510).
        record_scores(args.checkpoint, benchmark, {"J&F": round(g["J&F-Mean"], 6), "J": round(g["J-Mean"], 6),
                                                   "F": round(g["F-Mean"], 6), "size": size or "input"})
        print(f"\nRecorded the {benchmark} scores in {args.checkpoint}")
    print(f"\nEvaluation took {result.seconds:.2f} s; total time {time.perf_counter() - start:.2f} s")
    return 0


def _run_model(args, split, results_dir: Path, progress: bool):
    from corrvos import load_model
    from corrvos.eval.predict import predict_split

    device = run_device(args)
    model = load_model(args.checkpoint, device=device)
    options = tracker_options(args, model.config.arch)
    hook = recorder = None
    if args.correspondence:
        from corrvos.eval.correspondence_run import CorrespondenceRecorder

        recorder = CorrespondenceRecorder(split, k=args.k)
        hook = recorder.on_frame
    if args.label_propagation:
        from corrvos.eval.label_propagation import DEFAULT_CONTEXT, LabelPropagator

        options.update(tracker_class=LabelPropagator, radius=args.radius,
                       context=DEFAULT_CONTEXT if args.context is None else args.context)
    size = processing_size(args.size, model.preferred_size)
    what = "label propagation through the key space" if args.label_propagation else "processing"
    print(f"{args.checkpoint.name}: {what} at {f'{size}p' if size else 'the original size'} on {device}")
    stats = predict_split(split, model, results_dir, device=device, size=size,
                          progress=progress, on_frame=hook, **options)
    return stats, recorder, size


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CorrvosError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
