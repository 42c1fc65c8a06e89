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

from corrvos.inference.video_session import ModelTrack, VideoSession
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


@dataclass(kw_only=True)
class ModelRun(ModelTrack):
    """One checkpoint's results on the session's clip (corrvos's ModelTrack: ``labels``, ``passes``) plus what
    the app keeps: ``soft[t]``, the predicted frames' soft mattes ``{object id: PNG bytes}`` (compressed: a raw
    matte per object and frame would cost more memory than the frames), and the overlay video."""

    slot: str
    checkpoint: Path
    soft: dict[int, dict[int, bytes]] = field(default_factory=dict)
    video: Path | None = None

    @property
    def title(self) -> str:
        return f"{self.slot}: {self.checkpoint.name}"

    def forget(self, frames: set[int]) -> None:
        super().forget(frames)
        for t in frames:
            self.soft.pop(t, None)


@dataclass(kw_only=True)
class Session(VideoSession):
    """One browser session's clip, annotation and results: a corrvos VideoSession (frames, the given masks, the
    annotated frame, one run per model slot, propagation) plus what the app shows beside them."""

    names: list[str]
    fps: float
    source: str
    workdir: Path
    total_frames: int  # frames in the input before the cap
    mask: np.ndarray | None = None
    num_objects: int = 0
    gt: list[np.ndarray | None] | None = None
    example_mask: np.ndarray | None = None
    # The frame the editor holds for a correction (None: the editor holds the annotated frame).
    correcting: int | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].shape[:2]


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
    """Propagate every model from given frame ``start`` (the annotated frame or a correction) with the library's
    VideoSession (models in lock-step, so the live preview shows both at the same frame), keeping each predicted
    frame's soft mattes; a stopped run keeps what it has."""
    trackers = {slot: _tracker_factory(model, config) for slot, model in models.items()}
    for step in session.propagate(trackers, start):
        session.runs[step.key].soft[step.t] = {oid: matte_png(m) for oid, m in step.tracker.soft_masks(step.prob).items()}
        yield Progress(step.key, step.t, step.done, step.total)


def _tracker_factory(model, config: AppConfig):
    from corrvos import Tracker

    # Every frame stays explainable by a click (keys + memory snapshots; about 0.4 MB per 480p frame).
    return lambda: Tracker(model, device=config.device, size=processing_size(config.size, model.preferred_size),
                           match_cache_frames=None, **for_architecture(config.tracker_options, model.config.arch))
