"""Time the app's main path on the bundled example: propagate with two stcn-s checkpoints, then one click.

    .venv/bin/python scripts/time_app_example.py [--device cpu]

Uses two random-weight stcn-s checkpoints in a temporary folder (speed does not depend on the weights)
and calls the app's handlers directly, as a click in the browser would.
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
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp()) / "checkpoints"
    folder.mkdir()
    for seed, name in ((0, "a.safetensors"), (1, "b.safetensors")):
        torch.manual_seed(seed)
        corrvos.save_model(corrvos.build_model("stcn-s"), folder / name)
    handlers = AppHandlers(AppConfig(checkpoints=folder, device=args.device))
    example = list_examples()[0]
    handlers.load_example(example)
    _, mask_path = example_files(example)
    start = time.perf_counter()
    for last in handlers.propagate(None, str(mask_path), 0, "a.safetensors", "b.safetensors"):
        pass
    print(f"propagate A+B incl. overlay videos and chart: {time.perf_counter() - start:.1f} s")
    print(last[3])
    start = time.perf_counter()
    handlers.affinity_at(30, 400, 200)
    print(f"click (API twin) -> heatmaps: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
