"""The shipped-checkpoint recipe: baseline and correspondence arms of stcn-s and xmem-s in ONE time-boxed job.

    # here: the data the GPU machine needs (DAVIS-2016 train, ~35 MB), into a git-ignored folder
    python -m experiments.recipe pack --data ../shared/data/davis2016 \\
        --proposals resources/proposals_davis2016_train.npz --out .carry/d16train
    # there (scripts/gpu_train_shipped.sh runs this): train, then write the results to $OUT
    python3 -m experiments.recipe run --data .carry/d16train --out "$OUT" --budget-s 540

Plan (docs/training.md, "Training the shipped checkpoints"): every arm (``<model>_baseline`` with
``--corr none``, ``<model>_corr`` with ``--corr pcl,ocl``) runs ``corrvos/train.py`` twice, static
pretraining on the DAVIS-2016 train frames then main training on its videos (loading the static
weights), with the stage presets' batch / LR / schedule squeezed to ``--iters`` and the same seed.
The four arms run at the same time on the one GPU (the small models leave it idle between kernel
launches, which the other processes fill), each with an equal share of the CPU cores as loader
workers, reading frames decoded once into a shared memory-mapped store (``framestore.py``).

Identical budgets per pair: iterations are fixed per model, never time. If the wall-clock budget
ends first, every arm is stopped and each pair is returned at the latest point BOTH of its arms
reached: every arm writes fp16 weights every ``--snapshot-every`` iterations (and at the end of each
stage), so that point exists for both. ``run --resume-from DIR`` continues from such returned
weights (``train.py --load W --start-iteration K``: schedule, curriculum and data stream continue
exactly; the optimiser state restarts, since a full checkpoint of four arms (~80 MB each) cannot
come back from the machine).

``$OUT`` receives (at most 8 files, each under 16 MiB): ``<arm>.safetensors`` (fp16, metadata: stage,
iterations, stage_iters, train_options), ``summary.json`` (plan, commands, iterations, it/s, wall and
GPU minutes, final losses) and ``logs.tar.gz`` (every stage's log.csv and console output).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from corrvos.errors import DatasetError
from corrvos.models.checkpoint import checkpoint_metadata
from corrvos.models.config import PRESETS as MODEL_PRESETS
from corrvos.training.schedule import ALPHA_MAX
from corrvos.training.stages import STAGES, parse_stage_point, schedule_family

REPO = Path(__file__).resolve().parents[1]
# Arm variants: the shipped pair is baseline + corr; pcl and ocl complete the paper's Table 4 ablation.
VARIANTS = {"baseline": "none", "corr": "pcl,ocl", "pcl": "pcl", "ocl": "ocl"}
DEFAULT_VARIANTS = ("baseline", "corr")
# Iterations (static, main) per model for one ~9-minute job on one H100, four arms at once: see
# docs/training.md for the arithmetic. Both arms of a pair always get the same numbers.
DEFAULT_ITERS = {"stcn-s": (300, 800), "xmem-s": (200, 500)}
# Every small network preset can run (its iterations default to those of its schedule family).
MODEL_CHOICES = tuple(m for m in MODEL_PRESETS if schedule_family(m) in DEFAULT_ITERS)
Point = tuple[int, int]  # (stage index, iteration within that stage): ordered progress of an arm


@dataclass
class Arm:
    model: str
    variant: str
    iters: tuple[int, int]
    start: Point = (0, 0)
    start_weights: Path | None = None
    snapshots: dict[Point, Path] = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)
    error: str | None = None
    stop: Point | None = None  # end here instead of at the end of the main stage (schedule unchanged)

    @property
    def name(self) -> str:
        return f"{self.model}_{self.variant}"

    @property
    def corr(self) -> str:
        return VARIANTS[self.variant]

    @property
    def end(self) -> Point:
        return self.normalise(self.stop) if self.stop is not None else (1, self.iters[1])

    def normalise(self, point: Point) -> Point:
        """(0, static iters) and (1, 0) are the same weights; use the first form."""
        return (0, self.iters[0]) if point == (1, 0) else point


# ----------------------------------------------------------------------------------------------- pack

def pack(data: Path, proposals: Path | None, out: Path, split: str = "train",
         sequences: list[str] | None = None) -> int:
    """Copy what training on ``data``'s split needs into ``out`` (compact layout); returns its size in bytes.

    Videos are copied as they are; masks are re-encoded as 1-bit PNGs (DAVIS-2016 masks are 0/255,
    and every re-encoded mask is checked to decode to the same labels), about half the bytes; the
    split list holds only the names and the proposal arrays are stored compressed (same values).
    Small matters here: a later job carries this folder plus two arms' weights (~28 MB) in 64 MiB.
    """
    import numpy as np
    from PIL import Image

    from corrvos.io.davis import read_annotation
    from corrvos.training.layouts import is_compact, split_names

    if not is_compact(data):
        raise DatasetError(f"{data} is not the compact DAVIS-2016 copy (videos/ + Annotations/480p/).")
    names = sequences or split_names(data, split)
    if not names:
        raise DatasetError(f"{data} has no ImageSets list for split {split!r}.")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "ImageSets" / "480p").mkdir(parents=True, exist_ok=True)
    (out / "ImageSets" / "480p" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    for name in names:
        shutil.copy2(data / "videos" / f"{name}.mp4", out / "videos" / f"{name}.mp4")
        adir = out / "Annotations" / "480p" / name
        adir.mkdir(parents=True, exist_ok=True)
        for png in sorted((data / "Annotations" / "480p" / name).glob("*.png")):
            labels = read_annotation(png)
            if labels.max() > 1:
                raise DatasetError(f"{png} has more than one object; 1-bit packing is for DAVIS-2016 masks only.")
            target = adir / png.name
            Image.fromarray(labels.astype(bool)).save(target, optimize=True)
            if not (read_annotation(target) == labels).all():
                raise DatasetError(f"Re-encoding {png} changed its labels; copy the masks as they are.")
    if proposals is not None:
        with np.load(proposals, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        np.savez_compressed(out / "proposals.npz", **arrays)
        with np.load(out / "proposals.npz", allow_pickle=False) as z:
            if set(z.files) != set(arrays) or not all(np.array_equal(z[k], v) for k, v in arrays.items()):
                raise DatasetError(f"Re-saving {proposals} changed it; copy it as it is.")
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------- run

def plan_arms(models: list[str], iters: dict[str, tuple[int, int]], resume_from: Path | None,
              variants: tuple[str, ...] = DEFAULT_VARIANTS, stop: Point | None = None) -> list[Arm]:
    arms = []
    for model in models:
        if stop is not None and not (0 < stop[1] <= iters[model][stop[0]]):
            raise ValueError(f"--stop-at {STAGES[stop[0]]}:{stop[1]} is outside {model}'s "
                             f"{iters[model][stop[0]]} {STAGES[stop[0]]} iterations.")
        for variant in variants:
            arm = Arm(model, variant, iters[model], stop=stop)
            carried = resume_from / f"{arm.name}.safetensors" if resume_from else None
            if carried is not None and carried.is_file():
                meta = checkpoint_metadata(carried)
                stage = STAGES.index(meta["stage"])
                if int(meta["stage_iters"]) != arm.iters[stage]:
                    raise ValueError(f"{carried} comes from a {meta['stage']} stage of {meta['stage_iters']} iterations "
                                     f"but this plan has {arm.iters[stage]}; pass the same --iters as the first job.")
                arm.start = arm.normalise((stage, int(meta["iterations"])))
                if arm.start > arm.end:
                    raise ValueError(f"{carried} is already past --stop-at ({meta['stage']} {meta['iterations']}).")
                arm.start_weights = carried
                arm.snapshots[arm.start] = carried
            arms.append(arm)
    return arms


def stage_command(arm: Arm, stage: int, args: argparse.Namespace, workers: int, out: Path,
                  load: Path | None, start_iteration: int) -> list[str]:
    cmd = [sys.executable, str(REPO / "corrvos" / "train.py"), "--model", arm.model, "--stage", STAGES[stage],
           "--data", str(args.data), "--corr", arm.corr, "--iters", str(arm.iters[stage]), "--seed", str(args.seed),
           "--workers", str(workers), "--frame-cache", str(args.frame_cache), "--out", str(out),
           "--snapshot-every", str(args.snapshot_every), "--save-every", "0", "--keep-last", "1",
           "--log-every", str(args.log_every), "--no-progress"]
    if args.proposals:
        cmd += ["--proposals", str(args.proposals)]
    if load is not None:
        cmd += ["--load", str(load)]
    if start_iteration:
        cmd += ["--start-iteration", str(start_iteration)]
    if args.imagenet and load is None:
        cmd += ["--imagenet"]
    if stage == arm.end[0] and arm.end[1] < arm.iters[stage]:
        cmd += ["--stop-at", str(arm.end[1])]
    for flag, value in (("--device", args.device), ("--crop", args.crop), ("--sequences", args.sequences),
                        ("--batch", args.batch), ("--lr", args.lr), ("--bn", args.bn),
                        ("--bootstrap-p", args.bootstrap_p), ("--grad-clip", args.grad_clip),
                        ("--alpha-start", args.alpha_start), ("--alpha-warmup", args.alpha_warmup),
                        ("--alpha-max", args.alpha_max)):
        if value is not None:  # 0 is a value here (--alpha-max 0, --alpha-warmup 0)
            cmd += [flag, str(value)]
    return cmd


def last_log_row(path: Path) -> dict[str, str] | None:
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else None


def run_arm(arm: Arm, args: argparse.Namespace, workers: int, stop: threading.Event, log) -> None:
    """Run the arm's remaining stages one after the other; stop (terminate) when ``stop`` is set."""
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    if arm.start == arm.end:
        log(f"{arm.name}: already complete ({arm.start_weights})")
        return
    load, (stage0, k) = arm.start_weights, arm.start
    if arm.start == (0, arm.iters[0]):
        stage0, k = 1, 0
    for stage in range(stage0, arm.end[0] + 1):
        if stop.is_set() or arm.error:
            return
        out = args.work / arm.name / STAGES[stage]
        out.mkdir(parents=True, exist_ok=True)
        cmd = stage_command(arm, stage, args, workers, out, load, k)
        info = arm.stages.setdefault(STAGES[stage], {"command": " ".join(cmd), "start_iteration": k})
        t0 = time.time()
        with open(out / "console.log", "w") as console:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT)
            while proc.poll() is None:
                if stop.wait(1.0):
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        info["wall_s"] = round(time.time() - t0, 1)
        info["returncode"] = proc.returncode
        for snap in sorted((out / "snapshots").glob("weights_*.safetensors")):
            arm.snapshots[arm.normalise((stage, int(snap.stem.split("_")[1])))] = snap
        row = last_log_row(out / "log.csv")
        if row is not None:
            info["last_log"] = row
        if proc.returncode != 0:
            if not stop.is_set():
                tail = (out / "console.log").read_text(errors="replace")[-2000:]
                arm.error = f"{STAGES[stage]} stage exited with {proc.returncode}: ...{tail}"
                log(f"{arm.name}: {STAGES[stage]} FAILED ({proc.returncode}); see its console.log")
            return
        log(f"{arm.name}: {STAGES[stage]} done in {info['wall_s']} s")
        load, k = out / "final.safetensors", 0


def gpu_query() -> dict[str, str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.used,utilization.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    parts = [p.strip() for p in out.stdout.strip().split(",")]
    return dict(zip(("name", "memory_used_mib", "utilization_pct"), parts)) if len(parts) == 3 else {}


def progress_line(arms: list[Arm], work: Path) -> str:
    items = []
    for arm in arms:
        for stage in reversed(STAGES):
            row = last_log_row(work / arm.name / stage / "log.csv")
            if row is not None:
                items.append(f"{arm.name} {stage} it {row['iteration']} ({float(row['it_per_s']):.2f} it/s)")
                break
        else:
            items.append(f"{arm.name} starting")
    return "; ".join(items)


def run(args: argparse.Namespace) -> int:
    from corrvos.training.framestore import FrameStore, store_folder

    t_start = time.time()
    deadline = t_start + args.budget_s - args.reserve_s
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    driver_log = open(args.work / "driver.log", "a")

    def log(msg: str) -> None:
        line = f"[{time.time() - t_start:6.1f} s] {msg}"
        print(line, flush=True)
        driver_log.write(line + "\n")
        driver_log.flush()

    if args.proposals is None and (args.data / "proposals.npz").is_file():
        args.proposals = args.data / "proposals.npz"
    iters = {m: DEFAULT_ITERS[schedule_family(m)] for m in MODEL_CHOICES}
    for item in args.iters or []:
        model, _, value = item.partition("=")
        static, _, main = value.partition(",")
        iters[model] = (int(static), int(main))
    stop_at = parse_stage_point(args.stop_at) if args.stop_at else None
    arms = plan_arms(args.models, iters, args.resume_from, tuple(args.variants), stop_at)
    cpus = args.cpus or os.cpu_count() or 1
    workers = args.workers if args.workers is not None else max(1, (cpus - len(arms)) // len(arms))
    shm = shutil.disk_usage("/dev/shm").total / 2**30 if Path("/dev/shm").is_dir() else 0.0
    log(f"plan: {', '.join(f'{a.name} {a.iters} from {a.start}' for a in arms)}; {cpus} cores -> {workers} loader "
        f"workers per arm; /dev/shm {shm:.1f} GiB")

    seqs = [s for s in args.sequences.split(",") if s] if args.sequences else None
    t0 = time.time()
    store = FrameStore.open_or_build(args.data, store_folder(args.frame_cache, args.data), "train", seqs,
                                     workers=cpus, progress=False)
    decode_s = time.time() - t0
    log(f"frames decoded into {store.folder} ({store.nbytes / 2**30:.2f} GiB) in {decode_s:.1f} s")

    stop = threading.Event()
    threads = [threading.Thread(target=run_arm, args=(a, args, workers, stop, log), daemon=True) for a in arms]
    for t in threads:
        t.start()
    peak_mem, next_report = 0, time.time() + args.report_every
    while any(t.is_alive() for t in threads):
        if time.time() >= deadline:
            log("wall-clock budget reached: stopping every arm")
            stop.set()
            break
        time.sleep(1.0)
        if time.time() >= next_report:
            q = gpu_query()
            peak_mem = max(peak_mem, int(q.get("memory_used_mib", 0) or 0))
            gpu = f"; GPU {q['utilization_pct']} % busy, {q['memory_used_mib']} MiB" if q else ""
            log(progress_line(arms, args.work) + gpu)
            next_report = time.time() + args.report_every
    for t in threads:
        t.join()
    train_s = time.time() - t0 - decode_s
    summary = collect(arms, args, iters, workers, t_start, decode_s, train_s, peak_mem, log)
    log(f"done in {time.time() - t_start:.1f} s: " + ", ".join(
        f"{a['arm']} {a['returned']['stage']} {a['returned']['iteration']}" if a["returned"] else f"{a['arm']} nothing"
        for a in summary["arms"]))
    driver_log.close()
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
        tar.add(args.work / "driver.log", arcname="driver.log")
        for arm in arms:
            for stage in STAGES:
                for name in ("log.csv", "console.log"):
                    path = args.work / arm.name / stage / name
                    if path.is_file():
                        tar.add(path, arcname=f"{arm.name}/{stage}/{name}")
    return 0 if all(a["returned"] for a in summary["arms"]) else 1


def collect(arms: list[Arm], args: argparse.Namespace, iters: dict, workers: int, t_start: float, decode_s: float,
            train_s: float, peak_mem: int, log) -> dict:
    """Pick each pair's common point, copy those weights to OUT, write summary.json."""
    by_model: dict[str, list[Arm]] = {}
    for arm in arms:
        by_model.setdefault(arm.model, []).append(arm)
    out_arms = []
    for model, pair in by_model.items():
        reached = [max(a.snapshots) if a.snapshots else None for a in pair]
        common = None if None in reached else min(reached)
        for arm in pair:
            returned = None
            if common is not None and common in arm.snapshots and common != (0, 0):
                target = args.out / f"{arm.name}.safetensors"
                if arm.snapshots[common].resolve() != target.resolve():
                    shutil.copy2(arm.snapshots[common], target)
                returned = {"stage": STAGES[common[0]], "iteration": common[1], "stage_iters": arm.iters[common[0]],
                            "complete": common == arm.end, "file": target.name,
                            "bytes": target.stat().st_size}
            reached_point = max(arm.snapshots) if arm.snapshots else None
            out_arms.append({
                "arm": arm.name, "model": model, "corr": arm.corr, "iters": {"static": arm.iters[0], "main": arm.iters[1]},
                "started_at": {"stage": STAGES[arm.start[0]], "iteration": arm.start[1]},
                "reached": None if reached_point is None else {"stage": STAGES[reached_point[0]],
                                                               "iteration": reached_point[1]},
                "returned": returned, "stages": arm.stages, "error": arm.error,
            })
    wall = time.time() - t_start
    summary = {
        "recipe": "experiments.recipe", "seed": args.seed, "iters": {m: list(v) for m, v in iters.items()},
        "models": args.models, "data": str(args.data), "proposals": str(args.proposals) if args.proposals else None,
        "crop": args.crop, "batch": args.batch, "lr": args.lr, "bn": args.bn, "bootstrap_p": args.bootstrap_p,
        "grad_clip": args.grad_clip, "device": args.device or "cuda",
        "threads_per_arm": args.threads, "sequences": args.sequences, "snapshot_every": args.snapshot_every,
        "variants": args.variants, "stop_at": args.stop_at,
        "loader_workers_per_arm": workers, "arms_concurrently": len(arms), "budget_s": args.budget_s,
        "decode_s": round(decode_s, 1), "train_wall_s": round(train_s, 1), "wall_s": round(wall, 1),
        "gpu_minutes": round(wall / 60, 2) if args.device != "cpu" else 0.0, "gpu": gpu_query().get("name"), "peak_gpu_memory_mib": peak_mem,
        "arms": out_arms,
    }
    tmp = args.out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, args.out / "summary.json")
    return summary


# ----------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.recipe", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("pack", help="copy the DAVIS-2016 train data the GPU job needs into a folder to carry")
    k.add_argument("--data", type=Path, required=True, help="the compact DAVIS-2016 copy")
    k.add_argument("--proposals", type=Path, help="proposal cache of the train frames (copied as proposals.npz)")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--split", default="train")
    r = sub.add_parser("run", help="train every arm within --budget-s and write the results to --out")
    r.add_argument("--data", type=Path, required=True, help="compact DAVIS-2016 train copy (from `pack`)")
    r.add_argument("--proposals", type=Path, help="proposal cache (default: DATA/proposals.npz when present)")
    r.add_argument("--out", type=Path, required=True, help="results: <arm>.safetensors, summary.json, logs.tar.gz")
    r.add_argument("--work", type=Path, default=Path("/tmp/corrvos-recipe"), help="run folders (local disk)")
    r.add_argument("--frame-cache", type=Path, default=Path("/tmp/corrvos-frames"), help="decoded frames (3.4 GB)")
    r.add_argument("--resume-from", type=Path, help="folder with <arm>.safetensors returned by an earlier job")
    r.add_argument("--models", nargs="+", default=list(DEFAULT_ITERS), choices=list(MODEL_CHOICES))
    r.add_argument("--iters", nargs="+", metavar="MODEL=STATIC,MAIN",
                   help=f"iterations per model (default {' '.join(f'{m}={s},{n}' for m, (s, n) in DEFAULT_ITERS.items())})")
    r.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                   help="arms per model: baseline (--corr none), corr (pcl,ocl), pcl, ocl (the paper's Table 4)")
    r.add_argument("--stop-at", metavar="STAGE:ITERATION",
                   help="end every arm there, e.g. main:1000, with the schedule of the full --iters (default: the end)")
    r.add_argument("--budget-s", type=float, default=540.0, help="wall-clock seconds for the whole job")
    r.add_argument("--reserve-s", type=float, default=20.0, help="of which kept for writing the results")
    r.add_argument("--snapshot-every", type=int, default=25, help="fp16 weights every N iterations (pair sync points)")
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--report-every", type=float, default=30.0, help="progress line every N seconds")
    r.add_argument("--cpus", type=int, help="cores to share among the arms' loader workers (default: all)")
    r.add_argument("--seed", type=int, default=14159265)
    r.add_argument("--imagenet", action="store_true",
                   help="start the first stage from ImageNet weights (train.py --imagenet; the next stage loads it)")
    r.add_argument("--device", help="cpu for a dry run (default: cuda)")
    r.add_argument("--crop", type=int, help="crop size (default: the presets' 384)")
    r.add_argument("--batch", type=int, help="effective batch (default: the presets')")
    r.add_argument("--lr", type=float, help="learning rate (default: the presets')")
    r.add_argument("--bn", choices=["auto", "frozen", "encoder", "train"],
                   help="BatchNorm statistics in both stages (default: train.py's auto, i.e. the main stage, which "
                        "loads the static weights, freezes them)")
    r.add_argument("--bootstrap-p", type=float, default=1.0,
                   help="final hardest-pixel fraction of the CE (default 1.0: plain CE; with upstream's 0.15 every arm "
                        "of the first CPU run collapsed to a constant output once p reached 0.15)")
    r.add_argument("--grad-clip", type=float, default=0.0, metavar="NORM",
                   help="clip the global gradient norm (train.py --grad-clip; 0: off)")
    r.add_argument("--alpha-start", type=int, metavar="N", help="train.py --alpha-start (default: 0)")
    r.add_argument("--alpha-warmup", type=int, metavar="N", help="train.py --alpha-warmup (default: the presets')")
    r.add_argument("--alpha-max", type=float, metavar="A", help=f"train.py --alpha-max (default: {ALPHA_MAX})")
    r.add_argument("--threads", type=int, default=2, help="torch threads per arm (the CPU arms share the cores)")
    r.add_argument("--workers", type=int, help="loader workers per arm (default: the cores left over, shared)")
    r.add_argument("--sequences", help="comma-separated train sequences (default: all 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "pack":
        size = pack(args.data, args.proposals, args.out, args.split)
        print(f"packed {args.out}: {size / 2**20:.1f} MiB")
        return 0
    try:
        return run(args)
    except (ValueError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
