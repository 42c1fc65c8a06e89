"""Plotly figures of the app (hover-only: Gradio's Plot sends no clicks back)."""
from __future__ import annotations

from collections.abc import Sequence

from corrvos.io.masks import PALETTE
from corrvos.viz.compare import FrameSeries


def _rgb(k: int) -> str:
    r, g, b = (int(v) for v in PALETTE[k])
    return f"rgb({r},{g},{b})"


def comparison_figure(series: FrameSeries, titles: dict[str, str], given: Sequence[int] = ()):
    """Two rows: agreement (IoU A vs B, and J vs ground truth when given) and mask area per object.

    ``given`` frames (the annotated frame and the corrections) are marked with a dotted line.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
        subplot_titles=("IoU of A vs B" + (" and J vs ground truth" if series.j_gt else ""), "mask area per object (% of frame)"),
    )
    fig.add_trace(go.Scatter(x=series.frames, y=series.iou_ab, name="IoU A vs B", mode="lines", line=dict(color="black")), 1, 1)
    dashes = ["solid", "dash", "dot"]
    for i, (slot, values) in enumerate(series.j_gt.items()):
        fig.add_trace(
            go.Scatter(x=series.frames, y=values, name=f"J {titles.get(slot, slot)}", mode="lines+markers",
                       line=dict(dash=dashes[i % 3]), marker=dict(size=4)), 1, 1,
        )
    for i, (slot, per_obj) in enumerate(series.area.items()):
        for k, values in per_obj.items():
            pct = [None if v is None else 100 * v for v in values]
            fig.add_trace(
                go.Scatter(x=series.frames, y=pct, name=f"{slot} obj{k}", mode="lines",
                           line=dict(color=_rgb(k), dash=dashes[i % 3]), legendgroup=slot), 2, 1,
            )
    for t in given:
        fig.add_vline(x=t, line=dict(color="gray", dash="dot"))
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    fig.update_xaxes(title_text="frame", row=2, col=1)
    fig.update_layout(height=460, margin=dict(l=40, r=10, t=40, b=40), legend=dict(orientation="h", y=-0.18))
    return fig
