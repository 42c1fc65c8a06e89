"""Inference speed and memory of the Tracker, measured the way upstream measures it.

    python -m corrvos.bench --model stcn --frames 100 --objects 3 --resolution 480 --precision bf16 --device cuda
    python -m corrvos.bench --model xmem --long 10000 --device cuda --json xmem_long.json

Frames (a synthetic moving-blobs clip, or ``--video``) are prepared up front and already on the device,
so decoding and host-to-device copies are excluded. A short untimed warm-up video comes first; then one
video of ``--frames`` frames (mask on frame 0, ``last=True`` on the final frame) is timed as a whole,
with CUDA synchronised only before and after: amortised FPS = frames / time of the ``Tracker.step``
calls. ``--stages`` times key encoding, memory read, decoding, value encoding and memory write by
wrapping those methods from the outside (on a GPU in a separate pass, because it synchronises around
every call). ``--long N`` times one N-frame video and records memory at ``--long-points`` checkpoints.
Without ``--checkpoint`` the network has random weights: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from corrvos.errors import CorrvosError, InputError
from corrvos.models.config import PRESETS
from corrvos.precision import check_precision
from corrvos.tracker_options import add_tracker_arguments, tracker_options

if TYPE_CHECKING:  # type hints only: the tracker's modules are imported when a benchmark runs
    from corrvos.benchmarking.clip import BenchClip
    from corrvos.benchmarking.stages import StageTimer
    from corrvos.inference.tracker import Tracker

MODELS = tuple(PRESETS)
# Distinct frames kept on the device; longer runs cycle them (the synthetic motion is periodic in this).
MAX_DISTINCT_FRAMES = 100
COMPILED_METHODS = ("encode_key", "encode_value", "decode")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like the other errors of the CLI
        print(f"error: {message}; see python -m corrvos.bench --help", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m corrvos.bench",
        description="Amortised FPS, per-stage times and peak memory of Tracker.step on frames already on the device.",
        epilog="Errors are printed as one line starting with 'error:' and exit with status 2.",
    )
    p.add_argument("--model", choices=MODELS, default=None,
                   help="network (random weights unless --checkpoint is given)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="weights to load instead (corrvos .safetensors or upstream .pth); its architecture names the model")
    p.add_argument("--frames", type=int, default=100, help="timed frames (default 100)")
    p.add_argument("--objects", type=int, default=1, help="objects tracked (default 1)")
    p.add_argument("--resolution", type=int, default=480,
                   help="short side of the frames (synthetic: 16:9, 480 -> 480x864; --video is resized to it)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network's encode_key / encode_value / decode (warm up accordingly)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--video", type=Path, default=None,
                   help="time real frames from this video (first --frames frames, cycled if shorter) with a "
                        "synthetic first-frame mask")
    p.add_argument("--json", type=Path, default=None, help="also write every number and the environment here")
    p.add_argument("--warmup", type=int, default=10,
                   help="frames of an untimed warm-up video run before the timed one (default 10)")
    p.add_argument("--stages", action="store_true",
                   help="per-stage ms/frame (key encoding, memory read, decoding, value encoding, memory write)")
    p.add_argument("--long", type=int, default=None, metavar="N",
                   help="memory-growth run: time one N-frame video (instead of --frames) and record memory at checkpoints")
    p.add_argument("--long-points", type=int, default=10,
                   help="checkpoints of --long, evenly spaced (default 10: every N/10 frames)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the synthetic clip")
    add_tracker_arguments(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Raise InputError (one sentence) for values argparse cannot check."""
    if args.model is None and args.checkpoint is None:
        raise InputError("Give --model (stcn, stcn-s, xmem, xmem-s) or --checkpoint to say which network to time.")
    positive = {"--frames": args.frames, "--objects": args.objects, "--threads": args.threads,
                "--long": args.long, "--long-points": args.long_points}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise InputError(f"{flag} must be at least 1, not {value}.")
    if args.warmup < 0:
        raise InputError(f"--warmup must be 0 or more, not {args.warmup}.")
    if args.objects > 255:
        raise InputError(f"--objects must be at most 255 (label maps are uint8), not {args.objects}.")
    if args.resolution < 32:
        raise InputError(f"--resolution must be at least 32 pixels, not {args.resolution}.")
    if args.long is not None and args.long_points > args.long:
        raise InputError(f"--long-points ({args.long_points}) cannot exceed --long ({args.long}).")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA is not available on this machine; use --device cpu.")
    tracker_options(args)  # value errors; the architecture is checked once the model is known
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise InputError(f"The checkpoint {args.checkpoint} does not exist; give the path of a weights file.")
    if args.video is not None and not args.video.exists():
        raise InputError(f"The video {args.video} does not exist; give the path of a video file.")
    if args.json is not None and args.json.is_dir():
        raise InputError(f"--json {args.json} is a folder; give a file name.")


def prepare_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from corrvos import build_model, load_model

    if args.checkpoint is not None:
        model = load_model(args.checkpoint, device=device)
        if args.model is not None and model.config.name != args.model:
            raise InputError(
                f"--checkpoint holds a {model.config.name} network but --model says {args.model}; drop --model."
            )
    else:
        torch.manual_seed(args.seed)
        model = build_model(args.model).to(device).eval()
        if device.type == "cpu":
            # What load_model gives on the CPU (channels-last convolutions are ~1.7x faster there).
            model = model.to(memory_format=torch.channels_last)
    if args.compile:
        if not hasattr(torch, "compile"):
            raise InputError("This torch has no torch.compile; run without --compile.")
        for name in COMPILED_METHODS:
            setattr(model, name, torch.compile(getattr(model, name)))
    return model


def run_video(
    tracker: Tracker,
    clip: BenchClip,
    frames: int,
    sync: Callable[[], None],
    precision: str,
    timer: StageTimer | None = None,
    checkpoints: Iterable[int] = (),
    on_checkpoint: Callable[[int, float], None] | None = None,
    progress: bool = False,
) -> float:
    """Track one video of ``frames`` frames from a fresh memory; returns the seconds spent in ``step``.

    ``precision`` is the tracker's (``Tracker(precision=...)`` runs the network under autocast and
    keeps the memory in fp32); it is checked, not applied, here.
    ``on_checkpoint(frames_done, seconds_so_far)`` runs after the listed frame counts, off the clock.
    """
    from tqdm import tqdm

    if tracker.precision != precision:
        raise ValueError(f"the tracker runs in {tracker.precision}, not {precision}")
    tracker.reset()
    if timer is not None:
        timer.attach(tracker)  # reset() made a new memory: wrap its methods too
    marks = set(checkpoints)
    paused = 0.0
    bar = tqdm(total=frames, desc="tracking", unit="frame", disable=None if progress else True, leave=False)
    try:
        sync()
        start = time.perf_counter()
        for t in range(frames):
            tracker.step(clip.frame(t), clip.first_mask if t == 0 else None, last=t == frames - 1)
            if progress:
                bar.update()
            if t + 1 in marks and on_checkpoint is not None:
                sync()
                now = time.perf_counter()
                on_checkpoint(t + 1, now - start - paused)
                paused += time.perf_counter() - now
        sync()
        return time.perf_counter() - start - paused
    finally:
        bar.close()
        if timer is not None:
            timer.detach()


def _memory_snapshot(device: torch.device) -> dict:
    from corrvos.benchmarking.resources import cuda_mb, peak_rss_mb, rss_mb

    out = {"rss_mb": _round(rss_mb()), "rss_peak_mb": _round(peak_rss_mb())}
    if device.type == "cuda":
        now, peak = cuda_mb(device)
        out.update(gpu_mb=_round(now), gpu_peak_mb=_round(peak))
    return out


class LongRunRecorder:
    """Called at the checkpoints of a long run: elapsed time, memory sizes and process/GPU memory."""

    def __init__(self, tracker: Tracker, device: torch.device) -> None:
        self.tracker, self.device = tracker, device
        self.checkpoints: list[dict] = []
        self._previous = (0, 0.0)

    @staticmethod
    def points(frames: int, count: int) -> list[int]:
        return sorted({round(frames * (i + 1) / count) for i in range(count)})

    def __call__(self, done: int, seconds: float) -> None:
        stats = self.tracker.memory_stats()
        frames0, seconds0 = self._previous
        entry = {"frame": done, "seconds": round(seconds, 4),
                 "fps_since_previous": _round((done - frames0) / max(seconds - seconds0, 1e-9)),
                 "memory_frames": stats.memory_frames, "working_elements": stats.working_elements,
                 "long_term_elements": stats.long_term_elements, "consolidations": stats.consolidations}
        entry.update(_memory_snapshot(self.device))
        self.checkpoints.append(entry)
        self._previous = (done, seconds)


@contextlib.contextmanager
def compile_errors(active: bool) -> Iterator[None]:
    """torch.compile fails lazily, at a call: turn a backend failure into one actionable line."""
    if not active:
        yield
        return
    try:
        yield
    except (CorrvosError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - whatever the backend raises means the same to the user
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise InputError(
            f"torch.compile failed on this machine ({type(err).__name__}: {first_line}); run without --compile."
        ) from err


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(float(x), digits)


def bench(args: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed arguments; returns every number (the JSON document)."""
    from corrvos import Tracker
    from corrvos.benchmarking.clip import synthetic_clip, video_clip
    from corrvos.benchmarking.resources import environment, load_average
    from corrvos.benchmarking.stages import STAGES, StageTimer, cuda_sync

    check_args(args)
    load_at_start = load_average()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    sync = cuda_sync(device)
    check_precision(args.precision, device)  # unsupported precisions fail before any work

    model = prepare_model(args, device)
    options = tracker_options(args, model.config.arch)
    timed_frames = args.long if args.long is not None else args.frames
    distinct = min(max(timed_frames, args.warmup), MAX_DISTINCT_FRAMES)
    if args.video is not None:
        clip = video_clip(args.video, args.resolution, args.objects, distinct, device, seed=args.seed)
    else:
        clip = synthetic_clip(args.resolution, args.objects, distinct, device, seed=args.seed)
    tracker = Tracker(model, device=device, size=None, match_cache_frames=0, **options)

    if args.warmup:
        with compile_errors(args.compile):
            run_video(tracker, clip, args.warmup, sync, args.precision)

    instrument_timed_pass = args.stages and device.type == "cpu"  # no syncs on the CPU: nothing is perturbed
    timer = StageTimer(sync) if args.stages else None
    tracker.reset()  # free the warm-up's memory before the baseline is taken
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = _memory_snapshot(device)

    recorder = LongRunRecorder(tracker, device) if args.long is not None else None
    points = recorder.points(args.long, args.long_points) if recorder is not None else ()
    with compile_errors(args.compile):
        seconds = run_video(tracker, clip, timed_frames, sync, args.precision,
                            timer=timer if instrument_timed_pass else None, checkpoints=points,
                            on_checkpoint=recorder, progress=args.long is not None)
    peak = _memory_snapshot(device)
    final_stats = tracker.memory_stats()

    result: dict = {
        "model": model.config.name,
        "weights": str(args.checkpoint) if args.checkpoint is not None else "random",
        "objects": args.objects,
        "resolution": args.resolution,
        "frame_size": list(clip.size),
        "clip": clip.source,
        "precision": args.precision,
        "compile": args.compile,
        "warmup_frames": args.warmup,
        "frames": timed_frames,
        "seconds": round(seconds, 4),
        "fps": _round(timed_frames / seconds, 3),
        "ms_per_frame": _round(1000 * seconds / timed_frames, 3),
        "tracker": {"top_k": tracker.top_k, "mem_every": tracker.mem_every, "max_memory_frames": tracker.max_memory_frames,
                    **tracker.memory_options},
        "memory_stats": {"memory_frames": final_stats.memory_frames, "working_elements": final_stats.working_elements,
                         "long_term_elements": final_stats.long_term_elements,
                         "consolidations": final_stats.consolidations},
        "memory": _memory_report(device, baseline, peak, clip.megabytes),
    }
    if timer is not None:
        stage_seconds = seconds
        if not instrument_timed_pass:
            with compile_errors(args.compile):
                stage_seconds = run_video(tracker, clip, timed_frames, sync, args.precision, timer=timer,
                                          progress=args.long is not None)
        per_frame = {name: 1000 * timer.seconds[name] / timed_frames for name in STAGES}
        per_frame["other"] = 1000 * stage_seconds / timed_frames - sum(per_frame.values())
        result["stages"] = {
            "pass": "timed" if instrument_timed_pass else "separate (synchronised around every stage)",
            "seconds": round(stage_seconds, 4),
            "ms_per_frame": {k: _round(v, 3) for k, v in per_frame.items()},
            "calls": dict(timer.calls),
        }
    if args.long is not None:
        result["long"] = {"frames": args.long, "checkpoints": recorder.checkpoints}
    result["env"] = environment(device)
    result["env"]["load_average_at_start"] = load_at_start  # the CPU numbers mean little on a busy machine
    return result


def _memory_report(device: torch.device, baseline: dict, peak: dict, clip_mb: float) -> dict:
    if device.type == "cuda":
        return {
            "gpu_peak_mb": peak["gpu_peak_mb"],
            # weights + the clip's frames, allocated before the timed video
            "gpu_baseline_mb": baseline["gpu_mb"],
            "gpu_peak_above_baseline_mb": _round(peak["gpu_peak_mb"] - baseline["gpu_mb"]),
            "clip_mb": _round(clip_mb),
        }
    return {
        "rss_peak_mb": peak["rss_peak_mb"],  # process lifetime: includes model building and the clip
        "rss_before_mb": baseline["rss_mb"],
        "rss_after_mb": peak["rss_mb"],
        "clip_mb": _round(clip_mb),
    }


def format_report(r: dict) -> str:
    env = r["env"]
    device = f"{env['device']} ({env['device_name']}, {env['threads']} threads)"
    load = ""
    if env.get("load_average"):
        start = env.get("load_average_at_start")
        load = f", load average {start[0]:.2f} -> {env['load_average'][0]:.2f}" if start else \
            f", load average {env['load_average'][0]:.2f}"
    lines = [
        f"corrvos bench: {r['model']} ({'random weights' if r['weights'] == 'random' else r['weights']}), "
        f"{r['objects']} object{'s' if r['objects'] != 1 else ''}, {r['clip']}, {r['precision']}"
        f"{', compiled' if r['compile'] else ''}",
        f"  device            {device}{load}",
        f"  torch             {env['torch']}",
        f"  timed frames      {r['frames']} (after {r['warmup_frames']} warm-up frames)",
        f"  time in step      {r['seconds']:.3f} s",
        f"  FPS (amortised)   {r['fps']:.2f}",
        f"  ms / frame        {r['ms_per_frame']:.1f}",
    ]
    mem = r["memory"]
    if "gpu_peak_mb" in mem:
        lines.append(f"  peak GPU memory   {mem['gpu_peak_mb']:.0f} MiB ({mem['gpu_peak_above_baseline_mb']:.0f} MiB above "
                     f"weights + frames = {mem['gpu_baseline_mb']:.0f} MiB)")
    else:
        lines.append(f"  peak RSS          {mem['rss_peak_mb']:.0f} MiB (process lifetime; "
                     f"{mem['rss_before_mb']:.0f} -> {mem['rss_after_mb']:.0f} MiB over the timed video)")
    ms = r["memory_stats"]
    lines.append(f"  memory at end     {ms['memory_frames']} frames, {ms['working_elements']} working + "
                 f"{ms['long_term_elements']} long-term elements")
    if "stages" in r:
        st = r["stages"]
        total = 1000 * st["seconds"] / r["frames"]
        lines.append(f"stages (ms/frame; {st['pass']} pass, {total:.1f} ms/frame in all):")
        for name, value in st["ms_per_frame"].items():
            share = 100 * value / total if total > 0 else 0.0
            lines.append(f"  {name:<16}{value:9.2f}  {share:5.1f} %")
    if "long" in r:
        gpu = r["env"]["device"].startswith("cuda")
        col = "GPU peak MiB" if gpu else "RSS MiB (peak)"
        lines.append(f"long run ({r['long']['frames']} frames):")
        lines.append(f"  {'frame':>7} {'seconds':>9} {'FPS':>7} {col:>16} {'mem frames':>10} {'working':>8} {'long-term':>9}")
        for c in r["long"]["checkpoints"]:
            memory = f"{c['gpu_peak_mb']:.0f}" if gpu else f"{c['rss_mb']:.0f} ({c['rss_peak_mb']:.0f})"
            lines.append(f"  {c['frame']:>7} {c['seconds']:>9.2f} {c['fps_since_previous']:>7.2f} {memory:>16} "
                         f"{c['memory_frames']:>10} {c['working_elements']:>8} {c['long_term_elements']:>9}")
    return "\n".join(lines)


def write_json(path: Path, result: dict) -> None:
    """Atomic: a crash never leaves half a file where a previous result was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = bench(args)
        print(format_report(result))
        if args.json is not None:
            write_json(args.json, result)
            print(f"\nJSON written to {args.json}")
    except CorrvosError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print("error: the GPU ran out of memory; lower --objects, --resolution or --long, or use bf16.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
