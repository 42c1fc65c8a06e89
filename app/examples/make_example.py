"""Rebuild the bundled example clip from the shared DAVIS-2016 copy (run once; the output is committed).

    python app/examples/make_example.py [--seq blackswan] [--frames 40]

Writes app/examples/<seq>/<seq>.mp4 (H.264, 854x480, first N frames, default all 50 of blackswan) and 00000.png (the DAVIS
first-frame annotation as a DAVIS palette PNG, object 1).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from corrvos.io.davis import read_annotation
from corrvos.io.masks import write_mask
from corrvos.io.video import VideoFrames, VideoWriter

HERE = Path(__file__).resolve().parent
DAVIS = HERE.parents[2] / "shared" / "data" / "davis2016"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", default="blackswan")
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--davis", type=Path, default=DAVIS)
    args = ap.parse_args()
    out = HERE / args.seq
    out.mkdir(parents=True, exist_ok=True)
    video = VideoFrames(args.davis / "videos" / f"{args.seq}.mp4")
    # crf 23 keeps a 50-frame 480p clip under 1 MB; the DAVIS copy itself is crf 18.
    with VideoWriter(out / f"{args.seq}.mp4", fps=24, quality_crf=23) as writer:
        for t in range(min(args.frames, len(video))):
            writer.write(video[t])
    write_mask(out / "00000.png", read_annotation(args.davis / "Annotations" / "480p" / args.seq / "00000.png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
