"""App configuration, per-browser-session data and the propagation of two checkpoints.

Nothing here is Gradio-specific: handlers.py turns these objects into component values. Frames,
label maps and trackers live in a module-level store keyed by the Gradio session hash (never in
``gr.State``, which deep-copies its value on every event).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from corrvos.io.masks import matte_png
from corrvos.tracker_options import for_architecture, processing_size

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
CHECKPOINT_SUFFIXES = (".safetensors", ".pth")
# A (baseline, correspondence-trained) pair is two files whose names differ only in these words, e.g. the
# shipped stcn-s_baseline_cpu.safetensors / stcn-s_corr_cpu.safetensors.
PAIR_WORDS = ("baseline", "corr")
MAX_OBJECTS = 5
# Frames kept per video: on a 2-core CPU two small models take a few seconds per 480p frame together, so
# the CPU cap keeps one propagation to a few minutes.
FRAME_CAP = {"cpu": 100, "cuda": 1500}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class AppConfig:
    """Settings of one app instance (flags and environment variables fill it in ``__main__``)."""

    checkpoints: Path = field(default_factory=lambda: Path(os.environ.get("CORRVOS_CHECKPOINTS", REPO / "checkpoints")))
    device: str = field(default_factory=default_device)
    # The parsed --size (corrvos.tracker_options): None = each checkpoint's training scale
    # (model.preferred_size: 192 for the shipped models, 480 for upstream files); 0 = input size.
    size: int | None = None
    max_frames: int | None = None  # None: FRAME_CAP for the device
    preview_every: int = 5
    max_sessions: int = 4
    # Extra Tracker keywords from corrvos.tracker_options (memory settings, precision) for every model;
    # each model gets those of its architecture.
    tracker_options: dict = field(default_factory=dict)
    work_root: Path | None = None  # where overlay videos and exports go; a temp dir by default
    # Official checkpoints fetched with `python -m corrvos.weights fetch` (listed as "official/<file>"); None: none.
    weights_cache: Path | None = field(default_factory=lambda: _default_weights_cache())

    def __post_init__(self) -> None:
        self.checkpoints = Path(self.checkpoints)
        if self.max_frames is None:
            self.max_frames = FRAME_CAP["cuda" if self.device.startswith("cuda") else "cpu"]

    @property
    def device_label(self) -> str:
        if self.device.startswith("cuda"):
            import torch

            return f"GPU ({torch.cuda.get_device_name(0)})"
        return "CPU (no GPU found)"


OFFICIAL_PREFIX = "official/"


def _default_weights_cache() -> Path:
    from corrvos.weights import weights_dir

    return weights_dir()


def list_checkpoints(folder: Path, weights_cache: Path | None = None) -> list[str]:
    """Checkpoint file names in ``folder`` (safetensors and upstream .pth), sorted; then the official files
    fetched into ``weights_cache`` as ``official/<file>``."""
    def files(where: Path | None) -> list[str]:
        if where is None or not where.is_dir():
            return []
        return sorted(p.name for p in where.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)

    return files(folder) + [OFFICIAL_PREFIX + n for n in files(weights_cache)]


def checkpoint_file(config: AppConfig, name: str) -> Path:
    """The file behind a name of :func:`list_checkpoints` (an absolute path is taken as it is)."""
    if name.startswith(OFFICIAL_PREFIX) and config.weights_cache is not None:
        return config.weights_cache / name[len(OFFICIAL_PREFIX):]
    path = Path(name)
    return path if path.is_absolute() else config.checkpoints / name


def default_checkpoints(names: Sequence[str]) -> tuple[str | None, str | None]:
    """The first baseline/corr pair (STCN pairs before the others, then by name), else the first two files."""
    base, corr = PAIR_WORDS
    pairs = [(n, n.replace(base, corr, 1)) for n in names if base in n and n.replace(base, corr, 1) in names]
    if pairs:
        # The faster STCN pair suits a first look (and the CPU) better than XMem's.
        return min(pairs, key=lambda p: (not p[0].startswith("stcn"), p[0]))
    first = names[0] if names else None
    second = names[1] if len(names) > 1 else first
    return first, second


def list_examples() -> list[str]:
    """Bundled example clips: folders of app/examples holding a video and a 00000.png mask."""
    if not EXAMPLES_DIR.is_dir():
        return []
    return sorted(p.name for p in EXAMPLES_DIR.iterdir() if p.is_dir() and (p / "00000.png").is_file())


def example_files(name: str) -> tuple[Path, Path]:
    folder = EXAMPLES_DIR / name
    videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".mp4", ".webm"))
    return videos[0], folder / "00000.png"


class ModelCache:
    """Loaded checkpoints, keyed by (path, mtime, device), so re-running does not re-read the files."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._models: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, device: str):
        import corrvos

        key = (str(path), path.stat().st_mtime if path.exists() else 0.0, device)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        model = corrvos.load_model(path, device)
        with self._lock:
            self._models[key] = model
            while len(self._models) > self.capacity + 2:  # A and B plus a little slack for switching
                self._models.popitem(last=False)
        return model


@dataclass
class Pass:
    """One tracker's walk over the clip: ``frames[i]`` is the absolute frame of its step ``i``.

    A pass starts with the given (annotated or corrected) frames that lead to its first predicted frame,
    in order of their distance from the annotated frame, then runs to one end of the clip.
    """

    tracker: object
    frames: list[int]

    def local(self, t: int) -> int | None:
        try:
            return self.frames.index(t)
        except ValueError:
            return None


@dataclass
class ModelRun:
    """One checkpoint's results on the session's clip.

    ``labels[t]`` is the label map at the input size (None until frame t is done). ``soft[t]`` holds the
    predicted frames' soft mattes, ``{object id: PNG bytes}`` (compressed: a raw matte per object and frame
    would cost more memory than the frames). ``passes`` are the trackers that produced them, in the order they
    ran; a later pass (after a correction) supersedes an earlier one on the frames it predicts.
    """

    slot: str
    checkpoint: Path
    labels: list[np.ndarray | None]
    passes: list[Pass] = field(default_factory=list)
    soft: dict[int, dict[int, bytes]] = field(default_factory=dict)
    video: Path | None = None

    @property
    def title(self) -> str:
        return f"{self.slot}: {self.checkpoint.name}"

    @property
    def complete(self) -> bool:
        return all(lab is not None for lab in self.labels)

    @property
    def last_tracker(self) -> object | None:
        return self.passes[-1].tracker if self.passes else None


@dataclass
class Session:
    """One browser session's clip, annotation and results."""

    frames: list[np.ndarray]
    names: list[str]
    fps: float
    source: str
    workdir: Path
    total_frames: int  # frames in the input before the cap
    anno_t: int = 0
    mask: np.ndarray | None = None
    num_objects: int = 0
    runs: dict[str, ModelRun] = field(default_factory=dict)
    gt: list[np.ndarray | None] | None = None
    example_mask: np.ndarray | None = None
    # Every frame whose mask the user gave: the annotated frame and the corrections (absolute index -> labels).
    given: dict[int, np.ndarray] = field(default_factory=dict)
    # The frame the editor holds for a correction (None: the editor holds the annotated frame).
    correcting: int | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].shape[:2]

    def tracker_for(self, slot: str, t: int) -> tuple[Pass, int] | None:
        """The pass that predicted absolute frame ``t`` for model ``slot`` (the latest one), and t's step in it."""
        for p in reversed(self.runs[slot].passes):
            local = p.local(t)
            if local is not None and t not in self.given:
                return p, local
        return None

    def pass_plans(self, start: int) -> list[list[int]]:
        """The frame lists of the passes that (re)propagate from given frame ``start``.

        From the annotated frame: forward to the end and backward to frame 0. From a correction: away from
        the annotated frame only, so the frames between them keep their results. Each list opens with the
        given frames on that side up to ``start`` (they fill the memory), then the frames to predict; given
        frames further on are met on the way and keep their masks.
        """
        n = len(self.frames)
        t0 = self.anno_t
        directions = [1, -1] if start == t0 else [1 if start > t0 else -1]
        plans = []
        for d in directions:
            lead = sorted((g for g in self.given if 0 <= (g - t0) * d <= abs(start - t0)), key=lambda g: abs(g - t0))
            tail = list(range(start + d, n if d == 1 else -1, d))
            if tail:
                plans.append(lead + tail)
        return plans


class SessionStore:
    """The last few sessions by session hash; the oldest is dropped (with its temp files) beyond capacity."""

    def __init__(self, capacity: int, work_root: Path | None = None):
        self.capacity = capacity
        self.work_root = Path(work_root) if work_root else Path(tempfile.mkdtemp(prefix="corrvos-app-"))
        if work_root is None:
            # A temp root is ours alone: remove it (every session's overlays and exports) when the store goes
            # away or the app exits, so repeated runs do not pile up folders in /tmp. A given root is the user's.
            weakref.finalize(self, shutil.rmtree, self.work_root, True)
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def new_workdir(self, key: str) -> Path:
        path = self.work_root / key
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def put(self, key: str, session: Session) -> None:
        with self._lock:
            self._sessions[key] = session
            self._sessions.move_to_end(key)
            while len(self._sessions) > self.capacity:
                old_key, old = self._sessions.popitem(last=False)
                if old.workdir != session.workdir:
                    shutil.rmtree(old.workdir, ignore_errors=True)

    def get(self, key: str) -> Session | None:
        with self._lock:
            session = self._sessions.get(key)
            if session is not None:
                self._sessions.move_to_end(key)
            return session


@dataclass
class Progress:
    """One propagation step: frame ``t`` of model ``slot`` is done; ``done``/``total`` count model-frames."""

    slot: str
    t: int
    done: int
    total: int


def propagate_runs(session: Session, models: dict[str, object], config: AppConfig, start: int) -> Iterator[Progress]:
    """Propagate every model from given frame ``start`` (the annotated frame or a correction).

    The frames each pass predicts are cleared first; given frames keep the user's masks. Models advance in
    lock-step (one frame of A, one of B) so the live preview always shows both at the same frame. Results
    land in ``session.runs[slot].labels`` as they come, so a stopped run keeps what it has.
    """
    import torch

    from corrvos import Tracker

    plans = session.pass_plans(start)
    for run in session.runs.values():
        for plan in plans:
            for t in plan:
                run.labels[t] = None
                run.soft.pop(t, None)
        for t, mask in session.given.items():
            run.labels[t] = mask
            run.soft.pop(t, None)
    total = len(models) * sum(sum(t not in session.given for t in plan) for plan in plans)
    done = 0
    for plan in plans:
        steps = {}
        for slot, model in models.items():
            # Every frame stays explainable by a click (keys + memory snapshots; about 0.4 MB per 480p frame).
            tracker = Tracker(model, device=config.device, size=processing_size(config.size, model.preferred_size),
                              match_cache_frames=None,
                              **for_architecture(config.tracker_options, model.config.arch))
            run = session.runs[slot]
            run.passes.append(Pass(tracker, plan))
            run.passes = _without_superseded(run.passes, session.given)
            steps[slot] = _walk(tracker, session, plan)
        active = dict(steps)
        while active:
            for slot in list(active):
                # Entered per step, not around the loop: Gradio may resume this generator on another
                # worker thread, and inference mode is thread-local.
                try:
                    with torch.inference_mode():
                        t, lab, soft = next(active[slot])
                except StopIteration:
                    del active[slot]
                    continue
                session.runs[slot].labels[t] = lab
                session.runs[slot].soft[t] = soft
                done += 1
                yield Progress(slot, t, done, total)


def _without_superseded(passes: list[Pass], given: dict[int, np.ndarray]) -> list[Pass]:
    """Drop passes none of whose predicted frames is still theirs (a later pass predicts them all): their
    trackers keep keys and memory snapshots for every frame, which repeated corrections would pile up."""
    kept, covered = [], set()
    for p in reversed(passes):
        predicted = {t for t in p.frames if t not in given}
        if predicted - covered:
            kept.append(p)
        covered |= predicted
    return kept[::-1]


def _walk(tracker, session: Session, plan: list[int]) -> Iterator[tuple[int, np.ndarray, dict[int, bytes]]]:
    """Run ``tracker`` over the frames of ``plan``; yields (t, labels, soft mattes as PNG bytes) for each
    predicted frame."""
    masks = {i: session.given[t] for i, t in enumerate(plan) if i > 0 and t in session.given}
    # A given frame speaks for every object: one the user left out is absent there, not still to be tracked.
    results = tracker.propagate_probabilities((session.frames[t] for t in plan), session.given[plan[0]], masks,
                                              complete_masks=True)
    for i, prob in results:
        if plan[i] not in session.given:
            soft = {oid: matte_png(m) for oid, m in tracker.soft_masks(prob).items()}
            yield plan[i], tracker.labels_from(prob), soft
