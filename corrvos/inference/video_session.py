"""A video session, as SAM 2's video predictor: masks at any frames, propagation forward and backward from a
frame, corrections that re-propagate only away from the annotation, results kept per frame.

    session = VideoSession(frames)
    session.annotate(0, first_mask)                       # the annotation (resets every result)
    for step in session.propagate({"A": lambda: Tracker(model_a), "B": lambda: Tracker(model_b)}):
        ...                                               # step.key, step.t, step.prob, step.tracker
    session.correct(40, fixed_mask)                       # a correction on a predicted frame ...
    for step in session.propagate(trackers, start=40):    # ... re-propagates the frames beyond it only
        ...
    session.runs["A"].labels[t]; session.tracker_for("A", t)   # results; the pass that predicted frame t

Several models (keys) advance in lock-step, one frame each in turn, so a live view always shows all of them at
the same frame. A pass is one tracker's walk over the clip: it opens with the given frames on its side of the
annotation up to its start (they fill the memory) and runs to one end of the clip; given frames met on the way
keep their masks. ``complete_masks=True`` (the default, what a person's correction means): a given frame speaks
for every object, so one left out of it is absent there; ``False``: objects not in a later mask keep being
tracked there (YouTube-VOS style, as ``corrvos.infer`` reads a folder of masks).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from corrvos.errors import InputError


@dataclass
class Pass:
    """One tracker's walk: ``frames[i]`` is the absolute frame of its step ``i``."""

    tracker: Any
    frames: list[int]

    def local(self, t: int) -> int | None:
        try:
            return self.frames.index(t)
        except ValueError:
            return None


@dataclass
class ModelTrack:
    """One model's results on the session's clip: ``labels[t]`` (None until frame t is done) and its passes, in
    the order they ran (a later pass supersedes an earlier one on the frames it predicts)."""

    labels: list[np.ndarray | None]
    passes: list[Pass] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(lab is not None for lab in self.labels)

    def forget(self, frames: set[int]) -> None:
        """Drop the results of ``frames`` (a propagation is about to recompute them); a subclass that keeps
        more per frame drops that too."""
        for t in frames:
            self.labels[t] = None

    @property
    def last_tracker(self) -> Any | None:
        return self.passes[-1].tracker if self.passes else None


@dataclass
class Step:
    """Frame ``t`` of model ``key`` is done: its ``(K+1, H, W)`` probabilities, read with ``tracker`` (valid until
    the next step); ``done`` / ``total`` count model-frames of this propagation."""

    key: str
    t: int
    prob: Any
    tracker: Any
    done: int
    total: int


def pass_plans(num_frames: int, anno_t: int, given: Sequence[int], start: int,
               directions: Sequence[int] | None = None, keep_last: bool = False) -> list[list[int]]:
    """The frame lists of the passes that (re)propagate from given frame ``start``.

    From the annotated frame: forward to the end and backward to frame 0 (``directions`` picks and orders them,
    e.g. ``(-1, 1)``). From a correction: away from the annotated frame only, so the frames between them keep
    their results. Each list opens with the given frames on that side up to ``start``, then the frames to predict.
    ``keep_last``: a forward pass from the last frame is kept (it predicts nothing, but yields that frame).
    """
    if directions is None:
        directions = [1, -1] if start == anno_t else [1 if start > anno_t else -1]
    plans = []
    for d in directions:
        lead = sorted((g for g in given if 0 <= (g - anno_t) * d <= abs(start - anno_t)), key=lambda g: abs(g - anno_t))
        tail = list(range(start + d, num_frames if d == 1 else -1, d))
        if tail or (keep_last and d == 1):
            plans.append(lead + tail)
    return plans


def _without_superseded(passes: list[Pass], given: Mapping[int, np.ndarray]) -> list[Pass]:
    """Drop passes none of whose predicted frames is still theirs (a later pass predicts them all): their
    trackers keep keys and memory snapshots for every frame, which repeated corrections would pile up."""
    kept, covered = [], set()
    for p in reversed(passes):
        predicted = {t for t in p.frames if t not in given}
        if predicted - covered:
            kept.append(p)
        covered |= predicted
    return kept[::-1]


@dataclass
class VideoSession:
    """A clip, the masks a person gave on it, and the results of one or more models (``runs``, by key).

    ``frames`` is any sequence of ``HxWx3`` uint8 frames (a lazy one works: each pass reads its frames in order).
    ``keep_labels=False`` stores no label maps (a command line that writes each frame as it comes).
    """

    frames: Sequence[np.ndarray]
    given: dict[int, np.ndarray] = field(default_factory=dict)
    anno_t: int = 0
    runs: dict[str, ModelTrack] = field(default_factory=dict)
    complete_masks: bool = True
    keep_labels: bool = True

    # masks -----------------------------------------------------------------------------------------------
    def annotate(self, t: int, labels: np.ndarray) -> None:
        """The annotation: frame ``t``'s mask; every earlier mask and result is forgotten."""
        self._check(t)
        self.given, self.anno_t = {t: labels}, t
        for run in self.runs.values():
            run.labels, run.passes = [None] * len(self.frames), []

    def correct(self, t: int, labels: np.ndarray) -> None:
        """A mask on another frame (a correction, or objects that appear later); propagate from ``t`` next."""
        self._check(t)
        if not self.given:
            raise InputError("Annotate a frame before correcting another one.")
        self.given[t] = labels

    def _check(self, t: int) -> None:
        if not 0 <= t < len(self.frames):
            raise InputError(f"Frame {t} is outside the clip (frames 0 to {len(self.frames) - 1}).")

    # propagation ---------------------------------------------------------------------------------------------
    def pass_plans(self, start: int, directions: Sequence[int] | None = None) -> list[list[int]]:
        # Without complete masks the given frames from start on are results too, even a forward pass's only frame.
        return pass_plans(len(self.frames), self.anno_t, list(self.given), start, directions,
                          keep_last=not self.complete_masks)

    def propagate(self, trackers: Mapping[str, Callable[[], Any]], start: int | None = None,
                  directions: Sequence[int] | None = None) -> Iterator[Step]:
        """Propagate every model of ``trackers`` (key -> a function making a fresh Tracker) from given frame
        ``start`` (default: the annotated frame). The frames the passes predict are cleared first; results land
        in ``runs[key].labels`` as they come, so a stopped propagation keeps what it has."""
        import torch

        start = self.anno_t if start is None else start
        if start not in self.given:
            raise InputError(f"Frame {start} has no mask; propagate from the annotated frame or a corrected one.")
        plans = self.pass_plans(start, directions)
        for key in trackers:
            run = self.runs.setdefault(key, ModelTrack([None] * len(self.frames)))
            run.forget({t for plan in plans for t in plan} | set(self.given))
            for t, mask in self.given.items():
                run.labels[t] = mask if self.keep_labels else None
        total = len(trackers) * sum(len(self._outputs(plan, start)) for plan in plans)
        done = 0
        for plan in plans:
            walks = {}
            for key, make in trackers.items():
                tracker = make()
                run = self.runs[key]
                run.passes.append(Pass(tracker, plan))
                run.passes = _without_superseded(run.passes, self.given)
                walks[key] = (tracker, self._walk(tracker, plan, start))
            active = dict(walks)
            while active:
                for key in list(active):
                    tracker, walk = active[key]
                    # Entered per step, not around the loop: a UI may resume this generator on another thread,
                    # and inference mode is thread-local.
                    try:
                        with torch.inference_mode():
                            t, prob = next(walk)
                    except StopIteration:
                        del active[key]
                        continue
                    if self.keep_labels:
                        self.runs[key].labels[t] = tracker.labels_from(prob)
                    done += 1
                    yield Step(key, t, prob, tracker, done, total)

    def _outputs(self, plan: list[int], start: int) -> set[int]:
        """The frames of ``plan`` this propagation produces: the predicted ones; without complete masks also the
        given frames from ``start`` on, whose result merges the mask with the objects it leaves out. Frame
        ``start`` itself is the forward pass's (there always is one then, see ``keep_last``), so a backward and a
        forward pass from one frame never compute it twice."""
        predicted = {t for t in plan if t not in self.given}
        if self.complete_masks:
            return predicted
        from_start = plan[plan.index(start):] if start in plan else plan
        if plan[-1] < start:
            from_start = [t for t in from_start if t != start]
        return predicted | set(from_start)

    def _walk(self, tracker: Any, plan: list[int], start: int) -> Iterator[tuple[int, Any]]:
        masks = {i: self.given[t] for i, t in enumerate(plan) if i > 0 and t in self.given}
        results = tracker.propagate_probabilities((self.frames[t] for t in plan), self.given[plan[0]], masks,
                                                  complete_masks=self.complete_masks)
        outputs = self._outputs(plan, start)
        for i, prob in results:
            if plan[i] in outputs:
                yield plan[i], prob

    def tracker_for(self, key: str, t: int) -> tuple[Pass, int] | None:
        """The pass that predicted frame ``t`` for model ``key`` (the latest one), and t's step in it."""
        for p in reversed(self.runs[key].passes):
            local = p.local(t)
            if local is not None and t not in self.given:
                return p, local
        return None
