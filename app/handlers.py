"""Event handlers of the app: each turns component values into corrvos calls and back.

``AppHandlers`` holds the app's configuration, the loaded checkpoints and the per-session data; its
methods are bound to the UI in ui.py and are called directly by the tests (``request=None`` uses one
local session). Every error a person can cause reaches the browser as one ``gr.Error`` sentence.
"""
from __future__ import annotations

import functools
import inspect
import logging
import time
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np

from app import inputs
from app.charts import comparison_figure
from app.session import (
    MAX_OBJECTS,
    AppConfig,
    ModelCache,
    ModelRun,
    Session,
    SessionStore,
    checkpoint_file,
    default_checkpoints,
    example_files,
    list_checkpoints,
    propagate_runs,
)
from corrvos.errors import CheckpointError, CorrvosError, InputError
from corrvos.io.masks import check_mask, compact_labels, matte_png, read_mask, write_mask
from corrvos.io.video import VideoWriter, load_frames
from corrvos.models.provenance import describe_checkpoint
from corrvos.viz.affinity_view import AffinityView, render_affinity, stack_rows
from corrvos.viz.compare import disagreement_view, frame_series
from corrvos.viz.overlay import overlay

log = logging.getLogger("corrvos.app")
SLOTS = ("A", "B")

OOM_MESSAGE = (
    "ran out of memory while propagating; use a shorter or smaller video (or fewer objects) and try again."
)


def _as_gr_error(err: BaseException) -> gr.Error:
    """One sentence for the browser; unknown errors are logged with their traceback."""
    if isinstance(err, gr.Error):
        return err
    if isinstance(err, CorrvosError):
        return gr.Error(_sentence(str(err)))
    text = str(err)
    if type(err).__name__ == "OutOfMemoryError" or "out of memory" in text.lower() or isinstance(err, MemoryError):
        return gr.Error(_sentence(OOM_MESSAGE))
    log.exception("unexpected error in an app handler", exc_info=err)
    return gr.Error(f"Unexpected error ({type(err).__name__}: {text}); see the server log.")


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] if text else text


def user_errors(fn):
    """Re-raise every exception of a handler (plain or generator) as a ``gr.Error`` sentence."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (GeneratorExit, KeyboardInterrupt):
                raise
            except Exception as err:  # noqa: BLE001 - converted to one sentence for the browser
                raise _as_gr_error(err) from err

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise _as_gr_error(err) from err

    return wrapper


def _key(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


class AppHandlers:
    """All handlers of one app instance."""

    def __init__(self, config: AppConfig | None = None, models: ModelCache | None = None):
        self.config = config or AppConfig()
        self.store = SessionStore(self.config.max_sessions, self.config.work_root)
        self.models = models or ModelCache()

    # ------------------------------------------------------------------------------------------- status text
    def checkpoint_choices(self) -> tuple[list[str], str | None, str | None]:
        names = list_checkpoints(self.config.checkpoints, self.config.weights_cache)
        a, b = default_checkpoints(names)
        return names, a, b

    def checkpoint_message(self, ckpt_a: str | None = None, ckpt_b: str | None = None) -> str:
        """How many checkpoints there are, and what the chosen A and B are (from their training record)."""
        names = list_checkpoints(self.config.checkpoints, self.config.weights_cache)
        if not names:
            return (
                f"**No checkpoints found** in `{self.config.checkpoints}`. Put `*.safetensors` files (or upstream "
                "`stcn.pth` / `XMem.pth`) there, or fetch the official ones with `python -m corrvos.weights fetch "
                "xmem stcn stcn-corr`, and press ↻."
            )
        lines = [f"{len(names)} checkpoint(s) in `{self.config.checkpoints}`."]
        for slot, name in (("A", ckpt_a), ("B", ckpt_b)):
            if name in names:
                lines.append(f"**{slot}:** {describe_checkpoint(checkpoint_file(self.config, name))}")
        return "  \n".join(lines)

    def header(self) -> str:
        c = self.config
        size = "each checkpoint's training scale" if c.size is None else f"{c.size}p" if c.size else "input size"
        return (
            f"**Device:** {c.device_label} · **processing:** {size} (results at the input size) · "
            f"**frame cap:** {c.max_frames} frames on this device (longer videos are cut to their first "
            f"{c.max_frames} frames) · up to {MAX_OBJECTS} objects."
            + (f" · **tracker:** {', '.join(f'{k}={v}' for k, v in c.tracker_options.items())}" if c.tracker_options else "")
        )

    def refresh_checkpoints(self):
        names, a, b = self.checkpoint_choices()
        return (
            gr.Dropdown(choices=names, value=a),
            gr.Dropdown(choices=names, value=b),
            self.checkpoint_message(a, b),
        )

    # ------------------------------------------------------------------------------------------- input
    def _session(self, request: gr.Request | None) -> Session:
        session = self.store.get(_key(request))
        if session is None:
            raise InputError("no video is loaded; upload a video or a zip of frames, or load the example, first.")
        return session

    def _open(self, source: str | Path, request: gr.Request | None, label: str) -> Session:
        loaded = load_frames(source, lazy=True)
        total = len(loaded)
        if total == 0:
            raise InputError(f"{label} contains no frames; give a video or a zip with at least one frame.")
        keep = min(total, int(self.config.max_frames))
        frames = [np.ascontiguousarray(loaded.frames[t]) for t in range(keep)]
        key = _key(request)
        session = Session(
            frames=frames, names=list(loaded.names[:keep]), fps=float(loaded.fps or 24.0), source=label,
            workdir=self.store.new_workdir(key), total_frames=total,
        )
        self.store.put(key, session)
        return session

    def _input_outputs(self, session: Session, mask: np.ndarray | None = None):
        h, w = session.size
        n = len(session.frames)
        cut = ""
        if session.total_frames > n:
            cut = (
                f" ⚠️ The input has {session.total_frames} frames; only the first {n} are used "
                f"(frame cap on {self.config.device_label.split(' ')[0]})."
            )
        info = f"**{session.source}**: {n} frames, {w}x{h}, {session.fps:.3g} fps.{cut}"
        editor = self._editor_value(session, 0, mask)
        return editor, gr.Slider(minimum=0, maximum=max(n - 1, 0), value=0, step=1, interactive=n > 1), info

    def _editor_value(self, session: Session, t: int, mask: np.ndarray | None = None) -> dict:
        layers = []
        if mask is not None:
            # All layers are sent (empty ones too) so objects can still be added next to the given ones.
            count = max(MAX_OBJECTS, int(mask.max()))
            layers = [inputs.label_layer(mask, k) for k in range(1, count + 1)]
        return {"background": session.frames[t], "layers": layers, "composite": None}

    @user_errors
    def load_video(self, file: str | None, request: gr.Request | None = None):
        """Upload handler: a video (mp4, webm, mov, avi, ...) or a zip of frames."""
        if not file:
            raise InputError("no file was uploaded; choose a video or a zip of frames.")
        path = Path(file)
        session = self._open(path, request, path.name)
        return self._input_outputs(session)

    @user_errors
    def load_example(self, name: str | None, request: gr.Request | None = None):
        """Load a bundled example clip with its first-frame mask pre-drawn on the editor's layers."""
        if not name:
            raise InputError("no example is selected; pick one from the list.")
        video, mask_path = example_files(name)
        session = self._open(video, request, f"example {name} (DAVIS 2016)")
        session.example_mask = read_mask(mask_path)
        return self._input_outputs(session, session.example_mask)

    @user_errors
    def set_anno_frame(self, t: float, request: gr.Request | None = None) -> dict:
        """Show frame ``t`` in the editor so it can be annotated (the example's mask only on frame 0)."""
        session = self._session(request)
        t = int(np.clip(int(t or 0), 0, len(session.frames) - 1))
        mask = session.example_mask if t == 0 else None
        session.correcting = None
        return self._editor_value(session, t, mask)

    # ------------------------------------------------------------------------------------------- propagate
    def _checkpoint_path(self, name: str | None, slot: str) -> Path:
        if not name:
            if not list_checkpoints(self.config.checkpoints, self.config.weights_cache):
                raise CheckpointError(
                    f"no checkpoint is available in {self.config.checkpoints}; put .safetensors or upstream .pth files there."
                )
            raise CheckpointError(f"no checkpoint is chosen for model {slot}; pick one from the list.")
        path = checkpoint_file(self.config, name)
        if not path.is_file():
            raise CheckpointError(f"the checkpoint {path.name} for model {slot} does not exist any more; press ↻ and pick another.")
        return path

    def _views(self, session: Session, t: int):
        frame = session.frames[t]
        views = []
        for slot in SLOTS:
            run = session.runs.get(slot)
            lab = run.labels[t] if run is not None else None
            views.append(frame if lab is None else overlay(frame, lab))
        labs = [session.runs[s].labels[t] if s in session.runs else None for s in SLOTS]
        diff = disagreement_view(frame, labs[0], labs[1]) if all(l is not None for l in labs) else frame
        return views[0], views[1], diff

    def _view_updates(self, session: Session, t: int):
        """Views of frame ``t`` with the image labels naming the checkpoints (set once per propagation)."""
        a, b, diff = self._views(session, t)
        ta = session.runs["A"].title if "A" in session.runs else "A"
        tb = session.runs["B"].title if "B" in session.runs else "B"
        return gr.Image(value=a, label=ta), gr.Image(value=b, label=tb), diff

    @user_errors
    def propagate(
        self,
        editor: dict | None,
        mask_file: str | None,
        anno_t: float,
        ckpt_a: str | None,
        ckpt_b: str | None,
        gt_files: list[str] | str | None = None,
        request: gr.Request | None = None,
        progress: gr.Progress = gr.Progress(),
    ):
        """Propagate the annotation with checkpoints A and B; yields a live preview, then the results.

        Outputs: view A, view B, disagreement view, status, frame slider, video A, video B, chart.
        """
        session = self._session(request)
        if session.correcting is not None:
            # The editor holds a corrected frame, not the annotation: propagating it as frame t0 would be wrong.
            raise InputError(
                f"the editor holds frame {session.correcting} for a correction; press 'Re-propagate from the "
                "correction', or move the annotated-frame slider to annotate again."
            )
        t0 = int(np.clip(int(anno_t or 0), 0, len(session.frames) - 1))
        layers = editor.get("layers") if isinstance(editor, dict) else None
        mask = inputs.first_mask(layers, mask_file, session.frames[t0].shape)
        (mask,), back = compact_labels([mask])
        num_objects = int(np.count_nonzero(back))
        gt = inputs.read_ground_truth(gt_files, session.names, session.frames[0].shape) if gt_files else None
        paths = {"A": self._checkpoint_path(ckpt_a, "A"), "B": self._checkpoint_path(ckpt_b, "B")}
        models = {slot: self.models.get(path, self.config.device) for slot, path in paths.items()}

        session.mask, session.num_objects, session.gt, session.correcting = mask, num_objects, gt, None
        session.annotate(t0, mask)
        n = len(session.frames)
        session.runs = {slot: ModelRun(slot=slot, checkpoint=paths[slot], labels=[None] * n) for slot in SLOTS}
        yield from self._run_from(session, models, t0, progress)

    @user_errors
    def edit_frame(self, t: float, source: str | None = "B", request: gr.Request | None = None) -> tuple[dict, str]:
        """Put frame ``t`` with model ``source``'s masks into the editor, to be corrected there.

        Outputs: the editor value and a status line saying what to do next.
        """
        session = self._session(request)
        self._require_complete(session, "correcting a frame")
        t = int(np.clip(int(t or 0), 0, len(session.frames) - 1))
        slot = source if source in SLOTS else SLOTS[-1]
        session.correcting = t
        status = (
            f"Frame {t} is in the editor with {slot}'s masks: fix them (one layer per object; the eraser removes), "
            "then press 'Re-propagate from the correction'. Both models get the same corrected mask."
        )
        return self._editor_value(session, t, session.runs[slot].labels[t]), status

    @user_errors
    def correct(self, editor: dict | None, request: gr.Request | None = None, progress: gr.Progress = gr.Progress()):
        """Give both models the corrected mask of the frame in the editor and propagate again from there.

        Only the frames on the far side of the correction (seen from the annotated frame) are recomputed;
        both models get the same correction, so A and B stay comparable. Outputs as ``propagate``.
        """
        session = self._session(request)
        self._require_complete(session, "correcting a frame")
        t = session.correcting
        if t is None:
            raise InputError("no frame is being corrected; pick a frame with the frame slider and press 'Correct this frame' first.")
        layers = editor.get("layers") if isinstance(editor, dict) else None
        labels = inputs.labels_from_layers(layers)
        if labels is None:
            raise InputError(f"the correction of frame {t} marks no object; draw the objects' masks, or keep the results as they are.")
        labels = check_mask(labels, session.frames[t].shape)
        # Objects drawn on layers beyond the tracked ones are new from this frame on (as YouTube-VOS adds
        # objects), numbered after the tracked ones whichever layer they are on.
        new = [int(k) for k in np.unique(labels) if k > session.num_objects]
        if new:
            lut = np.arange(256, dtype=np.uint8)
            lut[new] = np.arange(session.num_objects + 1, session.num_objects + 1 + len(new))
            labels = lut[labels]
            session.num_objects += len(new)
        models = {slot: self.models.get(session.runs[slot].checkpoint, self.config.device) for slot in SLOTS}
        session.correct(t, labels)
        # The editor still holds frame t: it stays the frame being corrected, so it can be refined and re-run.
        yield from self._run_from(session, models, t, progress)

    @staticmethod
    def _require_complete(session: Session, what: str) -> None:
        if not session.runs:
            raise InputError(f"there are no results yet; press Propagate before {what}.")
        for slot, run in session.runs.items():
            if not run.complete:
                raise InputError(f"model {slot} did not finish every frame (the run was stopped); propagate again before {what}.")

    def _run_from(self, session: Session, models: dict, start: int, progress: gr.Progress):
        """Propagate from given frame ``start`` with live previews, then the overlay videos, chart and status."""
        n = len(session.frames)
        started = time.perf_counter()
        skip = gr.skip()
        steps = 0
        for step in propagate_runs(session, models, self.config, start):
            steps = step.total
            progress((step.done, step.total), desc=f"propagating ({step.slot} frame {step.t})")
            # Yield after every model step, not only with previews: Stop (a cancel) takes effect at the next
            # yield, so this keeps it within one frame's work.
            if step.slot == SLOTS[-1] and step.done % (2 * self.config.preview_every) == 0:
                a, b, diff = self._view_updates(session, step.t)
                status = f"Propagating… frame {step.t} ({step.done // 2}/{step.total // 2})."
                yield a, b, diff, status, skip, skip, skip, skip
            else:
                yield skip, skip, skip, skip, skip, skip, skip, skip
        elapsed = time.perf_counter() - started
        progress(None, desc="writing overlay videos")
        videos = [self._write_overlay_video(session, slot) for slot in SLOTS]
        fig = comparison_figure(frame_series({s: session.runs[s].labels for s in SLOTS}, session.num_objects, session.gt),
                                {s: session.runs[s].title for s in SLOTS}, given=sorted(session.given))
        a, b, diff = self._view_updates(session, start)
        frames_done = steps // len(SLOTS)
        per_frame = elapsed / frames_done if frames_done else 0.0
        corrections = sorted(t for t in session.given if t != session.anno_t)
        what = (
            f"annotated frame {session.anno_t}"
            + (f", corrected frame(s) {', '.join(map(str, corrections))}" if corrections else "")
        )
        status = (
            f"Done: {frames_done} of {n} frames propagated from frame {start}, {session.num_objects} object(s), {what}, "
            f"{elapsed:.1f} s ({per_frame:.2f} s per frame for A and B together on {self.config.device_label.split(' ')[0]}). "
            f"Memory at the last frame: {self._memory_text(session)}. "
            "Scrub the frame slider, click a pixel of A or B to inspect its memory read, or correct a frame."
        )
        slider = gr.Slider(minimum=0, maximum=max(n - 1, 0), value=start, step=1, interactive=n > 1)
        yield a, b, diff, status, slider, str(videos[0]), str(videos[1]), fig

    @staticmethod
    def _memory_text(session: Session) -> str:
        parts = []
        for slot, run in session.runs.items():
            tracker = run.last_tracker
            if tracker is None:
                continue
            stats = tracker.memory_stats()
            parts.append(f"{slot} {stats.memory_frames} frames / {stats.elements} elements (top-{tracker.top_k})")
        return ", ".join(parts) or "n/a"

    def _write_overlay_video(self, session: Session, slot: str) -> Path:
        run = session.runs[slot]
        path = session.workdir / f"overlay_{slot}_{run.checkpoint.stem}.mp4"
        with VideoWriter(path, fps=session.fps) as writer:
            for frame, lab in zip(session.frames, run.labels):
                writer.write(frame if lab is None else overlay(frame, lab))
        run.video = path
        return path

    @user_errors
    def show_frame(self, t: float, request: gr.Request | None = None):
        """Frame slider: A and B overlays and the disagreement view of frame ``t``."""
        session = self._session(request)
        t = int(np.clip(int(t or 0), 0, len(session.frames) - 1))
        return self._views(session, t)

    # ------------------------------------------------------------------------------------------- affinity
    @user_errors
    def click(self, t: float, evt: gr.SelectData, request: gr.Request | None = None):
        """Click on A, B or the disagreement view: ``evt.index`` is (x, y) in the frame's pixels."""
        x, y = evt.index[0], evt.index[1]
        return (*self._affinity(t, x, y, request), x, y)

    @user_errors
    def affinity_at(self, t: float, x: float, y: float, request: gr.Request | None = None):
        """API twin of the click (``gradio_client`` cannot fire ``.select``)."""
        return self._affinity(t, x, y, request)

    def _affinity(self, t: float, x: float, y: float, request: gr.Request | None):
        session = self._session(request)
        if not session.runs or not session.runs["A"].passes:
            raise InputError("there are no results to inspect yet; press Propagate first.")
        n = len(session.frames)
        t = int(np.clip(int(t or 0), 0, n - 1))
        h, w = session.size
        if x is None or y is None or not (0 <= x < w and 0 <= y < h):
            raise InputError(f"the point ({x}, {y}) lies outside the {w}x{h} frame; click inside the frame.")
        x, y = float(x), float(y)
        if t in session.given:
            kind = "the annotated frame" if t == session.anno_t else "a corrected frame"
            raise InputError(
                f"frame {t} is {kind}, whose mask was given and which reads no memory; move the frame slider to another frame."
            )
        galleries, strips, lines = [], [], []
        for slot in SLOTS:
            run = session.runs[slot]
            if run.labels[t] is None:
                raise InputError(f"frame {t} was not propagated (the run was stopped); propagate again or pick a done frame.")
            view = affinity_view(session, slot, t, x, y)
            galleries.append(view.panels)
            strips.append(view.strip)
            lines.append(view.text)
        strip = stack_rows(strips)
        text = "\n\n".join(lines)
        return galleries[0], galleries[1], strip, text

    # ------------------------------------------------------------------------------------------- export
    @user_errors
    def export(self, request: gr.Request | None = None) -> str:
        """Zip of palette PNGs per model (one per input frame), a black-and-white PNG per object and frame
        (mattes for video editors), the same as soft mattes (the model's probability, 0-255), and both overlay
        videos."""
        session = self._session(request)
        if not session.runs:
            raise InputError("there is nothing to export yet; press Propagate first.")
        for slot, run in session.runs.items():
            if not run.complete:
                raise InputError(f"model {slot} did not finish every frame (the run was stopped); propagate again, then export.")
        out = session.workdir / "corrvos_masks.zip"
        tmp = out.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for slot, run in session.runs.items():
                folder = f"{slot}_{run.checkpoint.stem}"
                for t, (name, lab) in enumerate(zip(session.names, run.labels)):
                    png = session.workdir / "png.tmp"
                    write_mask(png, lab)
                    zf.write(png, f"{folder}/{name}.png")
                    soft = run.soft.get(t, {})
                    for k in range(1, session.num_objects + 1):
                        hard = matte_png(np.where(lab == k, 255, 0).astype(np.uint8))
                        zf.writestr(f"{folder}_mattes/obj{k}/{name}.png", hard)
                        # Given frames are the user's own hard masks; an object not tracked yet is empty.
                        zf.writestr(f"{folder}_soft_mattes/obj{k}/{name}.png", soft.get(k, hard))
                if run.video is not None and run.video.is_file():
                    zf.write(run.video, f"overlay_{slot}_{run.checkpoint.stem}.mp4")
        tmp.replace(out)
        return str(out)


def affinity_view(session: Session, slot: str, t: int, x: float, y: float) -> AffinityView:
    """Ask model ``slot``'s tracker where pixel (x, y) of frame ``t`` read its memory from, and render it."""
    run = session.runs[slot]
    found = session.tracker_for(slot, t)
    if found is None:
        raise InputError(f"model {slot} has no result for frame {t}; propagate again.")
    walk, step = found
    return render_affinity(walk.tracker, step, x, y, frames=session.frames, frame_of=walk.frames, labels=run.labels,
                           num_objects=session.num_objects, name=slot, title=run.title)
