"""Affinity heatmap rendering, readouts and the A/B comparison helpers (numpy only, tiny arrays)."""
import math

import numpy as np
import pytest

from corrvos.viz.compare import DISAGREE_A_RGB, DISAGREE_B_RGB, disagreement_view, frame_series, mean_object_iou
from corrvos.viz.heatmap import (
    entropy,
    grid_to_image,
    match_strip,
    memory_frame_panel,
    object_coverage,
    summarize_affinity,
)


def test_grid_to_image_removes_padding_before_resizing():
    # A 2x3 grid at stride 4 covers a 8x12 padded image; pad (2, 2, 0, 0) leaves 8x8, shown at 16x16.
    grid = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    img = grid_to_image(grid, (16, 16), pad=(2, 2, 0, 0), stride=4, nearest=True)
    assert img.shape == (16, 16)
    # Column 0 of the image lies in cell column 0 (processing x 2..3 -> cell 0), the centre in cell 1.
    assert img[0, 0] == 1 and img[0, 8] == 2 and img[0, 15] == 3 and img[15, 0] == 4


def test_entropy_and_effective_matches():
    assert entropy(np.array([0.0, 1.0, 0.0])) == 0.0
    assert entropy(np.full(4, 0.25)) == pytest.approx(math.log(4))
    s = summarize_affinity([np.array([[0.5, 0.0]]), np.array([[0.25, 0.25]])])
    assert s.frame_weight == [0.5, 0.5]
    assert s.effective_matches == pytest.approx(math.exp(entropy(np.array([0.5, 0.25, 0.25]))))


def test_object_share_counts_partial_cells_by_coverage():
    # One 2x2 grid at stride 2 over a 4x4 image; object 1 covers the left half of cell (0, 0) only.
    labels = np.zeros((4, 4), np.uint8)
    labels[0:2, 0] = 1
    cover = object_coverage(labels, (2, 2), stride=2, num_objects=1)
    assert cover[1, 0, 0] == pytest.approx(0.5) and cover[1].sum() == pytest.approx(0.5)
    grid = np.array([[0.6, 0.4], [0.0, 0.0]])
    s = summarize_affinity([grid], [labels], stride=2, num_objects=1)
    assert s.object_share[1] == pytest.approx(0.3)
    assert s.object_share[0] == pytest.approx(0.7)


def test_panels_and_strip_draw_markers_where_the_matches_are():
    frame = np.full((48, 64, 3), 90, np.uint8)
    grid = np.zeros((3, 4), np.float32)  # stride 16 over 48x64: cell (0, 2) is x 32..47, y 0..15
    grid[0, 2] = 0.8
    panel = memory_frame_panel(frame, grid, [(40, 8, 0.8, 1)], "t=3 weight 0.80")
    assert panel.shape[1] == 64 and panel.shape[0] > 48  # caption bar on top
    assert panel.dtype == np.uint8
    # The hot cell is brighter than the dimmed background far from it.
    bar = panel.shape[0] - 48
    assert panel[bar + 8, 36].mean() > panel[bar + 40, 5].mean()
    small = memory_frame_panel(frame, grid, [(40, 8, 0.8, 1)], "t=3", max_width=32)
    assert small.shape[1] == 32
    strip = match_strip(frame, (10, 10), [(3, frame), (7, frame)], [(3, 42, 12, 0.8), (7, 5, 5, 0.1)], height=48)
    assert strip.shape[1] == 3 * 64 and strip.dtype == np.uint8
    assert (strip != 90).any()


def test_disagreement_view_and_series():
    frame = np.full((8, 8, 3), 100, np.uint8)
    a = np.zeros((8, 8), np.uint8)
    b = np.zeros((8, 8), np.uint8)
    a[:4, :4] = 1
    b[:4, 2:6] = 1
    view = disagreement_view(frame, a, b)
    assert tuple(view[0, 0]) == DISAGREE_A_RGB
    assert tuple(view[0, 5]) == DISAGREE_B_RGB
    assert mean_object_iou(a, b, 1) == pytest.approx(8 / 24)
    s = frame_series({"A": [a, None], "B": [b, b]}, 1, gt=[b, None])
    assert s.iou_ab[0] == pytest.approx(8 / 24) and s.iou_ab[1] is None
    assert s.area["A"][1][0] == pytest.approx(16 / 64)
    assert s.j_gt["B"][0] == 1.0 and s.j_gt["A"][1] is None
