import numpy as np
import pytest

from corrvos.io.masks import PALETTE
from corrvos.viz.overlay import object_contours, overlay


def _scene():
    frame = np.full((40, 50, 3), 100, np.uint8)
    labels = np.zeros((40, 50), np.uint8)
    labels[10:30, 5:20] = 1
    labels[0:12, 30:50] = 2  # touches the top and right image borders
    return frame, labels


def test_overlay_blends_inside_and_keeps_background():
    frame, labels = _scene()
    out = overlay(frame, labels, alpha=0.5, contour_width=0)
    assert out.dtype == np.uint8 and out.shape == frame.shape
    assert np.array_equal(out[labels == 0], frame[labels == 0])
    # 0.5 * 100 + 0.5 * palette colour, rounded
    assert tuple(out[20, 10]) == (114, 50, 50)   # object 1: (128, 0, 0)
    assert tuple(out[5, 40]) == (50, 114, 50)    # object 2: (0, 128, 0)
    assert np.array_equal(overlay(frame, labels, alpha=0.0, contour_width=0), frame)


def test_contours_are_inner_borders_in_palette_colour():
    frame, labels = _scene()
    edges = object_contours(labels, width=1)
    assert edges[10, 10] == 1 and edges[29, 10] == 1 and edges[20, 5] == 1 and edges[20, 19] == 1
    assert edges[20, 12] == 0 and edges[35, 40] == 0
    assert edges[0, 40] == 2 and edges[5, 49] == 2           # image borders count as borders
    assert set(np.unique(edges[labels == 0])) == {0}          # never outside an object
    out = overlay(frame, labels, alpha=0.3, contour_width=1)
    assert tuple(out[10, 10]) == tuple(PALETTE[1]) and tuple(out[0, 40]) == tuple(PALETTE[2])
    assert tuple(out[20, 12]) != tuple(PALETTE[1])            # interior is blended, not solid


def test_overlay_rejects_mismatched_inputs():
    frame, labels = _scene()
    with pytest.raises(ValueError, match="do not match"):
        overlay(frame, labels[:-1])
    with pytest.raises(ValueError, match="RGB uint8"):
        overlay(frame.astype(np.float32), labels)
