"""Data-pipeline throughput: training samples per second of ONE process on one core.

    python -m experiments.bench_data --data ../shared/data/davis2016 --proposals resources/proposals_davis2016_train.npz \\
        --kinds stcn xmem static --samples 60 [--frame-cache /tmp/d16-frames]

Builds the datasets the trainer would build (``Trainer._clip_config`` presets: STCN 3 frames / 2 objects /
bicubic, XMem 8 frames / 3 objects / bilinear, static 3 frames / 1 object; crop 384, second view on)
and times ``dataset[SampleKey(index, step, max_skip)]`` for consecutive training steps, as a loader
worker does (torch and OpenCV limited to one thread each). The first sample of each kind is untimed
(it opens files). CPU time of the process is the number to compare (wall time is printed too, with
the load average, because other processes on a shared machine stretch it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

KINDS = ("stcn", "xmem", "static")


def build(kind: str, data: str, proposals: str | None, crop: int, sequences: list[str] | None,
          frame_cache: str | None, seed: int = 0):
    from corrvos.training.datasets import ClipConfig, StaticClips, VideoClips

    source = data
    if frame_cache:
        from corrvos.training.framestore import FrameStore

        source = FrameStore.open_or_build(data, frame_cache, sequences=sequences, progress=False)
    if kind == "static":
        cfg = ClipConfig.preset("stcn", max_objects=1, crop_size=crop)
        if frame_cache:
            return StaticClips.from_store(source, config=cfg, proposals=proposals, seed=seed)
        return StaticClips.from_video_layout(source, sequences=sequences, config=cfg, proposals=proposals, seed=seed)
    cfg = ClipConfig.preset(kind, crop_size=crop)
    return VideoClips(source, cfg, sequences=None if frame_cache else sequences, proposals=proposals, seed=seed)


def bench(dataset, samples: int, max_skip: int = 10) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per sample."""
    from corrvos.training.datasets import SampleKey

    n = len(dataset)
    dataset[SampleKey(0, 0, max_skip)]
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(samples):
        dataset[SampleKey((i * 7919) % n, i + 1, max_skip)]
    return (time.perf_counter() - start) / samples, (time.process_time() - cpu) / samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="DAVIS / compact DAVIS-2016 folder")
    p.add_argument("--proposals", help="proposal cache (.npz)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--crop", type=int, default=384)
    p.add_argument("--sequences", help="comma-separated sequence names (default: the train split)")
    p.add_argument("--frame-cache", help="decode the data once into this folder and read the frames from it")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    seqs = [s for s in args.sequences.split(",") if s] if args.sequences else None
    results = []
    for kind in args.kinds:
        t0 = time.perf_counter()
        ds = build(kind, args.data, args.proposals, args.crop, seqs, args.frame_cache)
        setup = time.perf_counter() - t0
        wall, cpu = bench(ds, args.samples)
        load = os.getloadavg()[0]
        results.append({"kind": kind, "samples_per_cpu_s": 1 / cpu, "cpu_ms_per_sample": 1000 * cpu,
                        "wall_ms_per_sample": 1000 * wall, "setup_s": setup, "load_avg_1min": load,
                        "frame_cache": bool(args.frame_cache), "crop": args.crop})
        print(f"{kind:7s} {1 / cpu:7.2f} samples per CPU-second ({1000 * cpu:6.1f} ms CPU, {1000 * wall:6.1f} ms "
              f"wall per sample; setup {setup:5.1f} s; load average {load:.2f}; {os.cpu_count()} cores)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
