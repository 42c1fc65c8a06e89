"""Where one pixel's memory read went, rendered: heatmap panels per memory frame, a match strip, a text readout.

Shared by the app's click panel and ``python -m corrvos.matches`` so both show the same picture.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from corrvos.viz.heatmap import AffinitySummary, match_strip, memory_frame_panel, summarize_affinity

MATCHES_SHOWN = 5  # numbered markers per query and model (the read itself uses the model's top-k)
PANEL_WIDTH = 480  # memory-frame panels are drawn at most this wide
STRIP_HEIGHT = 200


@dataclass
class AffinityView:
    """One model's answer for one query pixel: ``panels`` (image, caption) per memory frame, ``strip`` (the
    query frame beside its best matches), ``text`` (a one-paragraph readout, Markdown) and the numbers."""

    panels: list[tuple[np.ndarray, str]]
    strip: np.ndarray
    text: str
    summary: AffinitySummary  # summary.frame_weight[i] belongs to memory_frames[i]
    memory_frames: list[int]  # indices into ``frames``
    top: list[tuple[int, float, float, float]]  # (frame, x, y, weight), frames as in ``frames``


def render_affinity(
    tracker,
    step: int,
    x: float,
    y: float,
    frames: Sequence[np.ndarray],
    frame_of: Sequence[int],
    labels: Sequence[np.ndarray | None],
    num_objects: int,
    name: str,
    title: str | None = None,
) -> AffinityView:
    """Ask ``tracker`` where pixel (x, y) of its ``step``-th frame read its memory from, and draw it.

    ``frame_of[i]`` is the index into ``frames`` / ``labels`` of the tracker's i-th frame (a backward pass
    or a correction's pass walks the video in another order); ``labels`` may hold None for frames without
    a result, in which case the per-object share of the weight is not computed. ``name`` labels the
    images (e.g. "A"), ``title`` the readout (default ``name``).
    """
    m = tracker.matches(step, int(x), int(y), k=MATCHES_SHOWN)
    t = frame_of[step]
    pad = tuple(tracker.geometry.pad)
    memory = [frame_of[f] for f in m.memory_frames]
    grids = [g.numpy() for g in m.heatmaps]
    masks = [labels[f] for f in memory]
    summary = summarize_affinity(grids, masks if all(mask is not None for mask in masks) else None, pad,
                                 num_objects=num_objects)
    top = [(frame_of[f], mx, my, w) for f, mx, my, w in m.top]
    vmax = max(float(g.max()) for g in grids) if grids else None
    panels = []
    for t_mem, grid, weight in zip(memory, grids, summary.frame_weight):
        points = [(mx, my, w, rank) for rank, (f, mx, my, w) in enumerate(top, start=1) if f == t_mem]
        panel = memory_frame_panel(frames[t_mem], grid, points, f"{name}  t={t_mem}  weight {weight:.2f}",
                                   pad=pad, vmax=vmax, max_width=PANEL_WIDTH)
        panels.append((panel, f"{name} · memory frame {t_mem} · weight {weight:.3f}"))
    shown = sorted({f for f, *_ in top})
    strip = match_strip(frames[t], (x, y), [(f, frames[f]) for f in shown], top,
                        height=STRIP_HEIGHT, query_label=f"{name} t={t}")
    per_frame = ", ".join(f"t={f}: {w:.2f}" for f, w in sorted(zip(memory, summary.frame_weight), key=lambda p: -p[1]))
    share = ", ".join(
        ("background" if k == 0 else f"obj{k}") + f" {100 * v:.0f}%" for k, v in summary.object_share.items()
    )
    best = top[0] if top else None
    best_txt = (
        f" Best match: frame {best[0]} at ({best[1]:.0f}, {best[2]:.0f}), weight {best[3]:.3f}, "
        f"{float(np.hypot(best[1] - x, best[2] - y)):.0f} px from the query pixel." if best else ""
    )
    own = labels[t]
    predicted = "n/a" if own is None else ("background" if own[int(y), int(x)] == 0 else f"obj{int(own[int(y), int(x)])}")
    text = (
        f"**{title or name}**: frame {t}, pixel ({x:.0f}, {y:.0f}), predicted {predicted}. "
        f"Entropy {summary.entropy:.2f} nats (≈{summary.effective_matches:.1f} effective matches of top-{tracker.top_k} "
        f"over {len(memory)} memory frames). Weight per memory frame: {per_frame}. "
        f"Share of weight inside each mask: {share or 'n/a'}.{best_txt}"
    )
    return AffinityView(panels, strip, text, summary, memory, top)


def stack_rows(images: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Stack RGB images vertically with a black gap, padding narrower ones on the right with black."""
    width = max(im.shape[1] for im in images)
    rows = [np.pad(im, ((0, gap), (0, width - im.shape[1]), (0, 0))) for im in images]
    return np.concatenate(rows, axis=0)[: -gap or None]
