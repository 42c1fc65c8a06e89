"""Time the app's main path on the bundled example: propagate with two checkpoints, then one click.

    .venv/bin/python scripts/time_app_example.py [--device cpu] [--shipped [--pair A B]]

Uses two random-weight stcn-s checkpoints in a temporary folder (run at 480p), or with --shipped the app's
default pair from checkpoints/ (run at their training scale; --pair names two other files there), and calls
the app's handlers directly, as a click in the browser would.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import corrvos  # noqa: E402
from app.handlers import AppHandlers  # noqa: E402
from app.session import AppConfig, example_files, list_examples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shipped", action="store_true", help="time the shipped default pair instead of random weights")
    ap.add_argument("--pair", nargs=2, metavar=("A", "B"), help="with --shipped: these two files of checkpoints/")
    args = ap.parse_args()
    if args.shipped:
        handlers = AppHandlers(AppConfig(device=args.device))
        names, a, b = handlers.checkpoint_choices()
        if args.pair:
            missing = [n for n in args.pair if n not in names]
            if missing:
                sys.exit(f"not in checkpoints/: {', '.join(missing)}; choose from {', '.join(names)}")
            a, b = args.pair
        if a is None:
            sys.exit("no checkpoints in checkpoints/; run without --shipped")
    else:
        folder = Path(tempfile.mkdtemp()) / "checkpoints"
        folder.mkdir()
        a, b = "a.safetensors", "b.safetensors"
        for seed, name in ((0, a), (1, b)):
            torch.manual_seed(seed)
            corrvos.save_model(corrvos.build_model("stcn-s"), folder / name)
        handlers = AppHandlers(AppConfig(checkpoints=folder, device=args.device))
    example = list_examples()[0]
    handlers.load_example(example)
    _, mask_path = example_files(example)
    start = time.perf_counter()
    for last in handlers.propagate(None, str(mask_path), 0, a, b):
        pass
    print(f"{a} + {b}: propagate A+B incl. overlay videos and chart: {time.perf_counter() - start:.1f} s")
    print(last[3])
    start = time.perf_counter()
    handlers.affinity_at(30, 400, 200)
    print(f"click (API twin) -> heatmaps: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
