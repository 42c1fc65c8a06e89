"""J, F and statistics on crafted masks; every expected number is derived by hand in the comments."""
import math

import numpy as np
import pytest

from corrvos.eval.metrics import (
    boundary_f,
    boundary_tolerance,
    decay_bin_indices,
    disk,
    jaccard,
    object_statistics,
    seg2bmap,
)


def box(shape, r0, r1, c0, c1):
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def test_jaccard_shifted_square():
    # 10x10 square vs the same square shifted 5 columns: overlap 10*5 = 50, union 100 + 100 - 50 = 150.
    gt = box((40, 40), 0, 10, 0, 10)
    pred = box((40, 40), 0, 10, 5, 15)
    assert jaccard(gt, pred) == pytest.approx(50 / 150, abs=0)


def test_jaccard_edge_cases_and_stack():
    empty = np.zeros((8, 8), bool)
    obj = box((8, 8), 2, 4, 2, 4)
    assert jaccard(obj, empty) == 0.0        # empty prediction: 0 / 4
    assert jaccard(empty, obj) == 0.0        # empty GT: 0 / 4
    assert jaccard(empty, empty) == 1.0      # empty union scores 1
    stack = jaccard(np.stack([obj, empty]), np.stack([obj, empty]))
    assert stack.dtype == np.float64 and stack.tolist() == [1.0, 1.0]


def test_disk_matches_definition():
    # radius 2: x^2 + y^2 <= 4 -> centre, 4 at distance 1, 4 diagonals (2 <= 4), 4 at distance 2 = 13 points.
    d = disk(2)
    assert d.shape == (5, 5) and d.dtype == np.uint8 and int(d.sum()) == 13
    assert d[0, 0] == 0 and d[0, 2] == 1 and d[1, 1] == 1
    assert int(disk(1).sum()) == 5  # a plus sign


def test_tolerance_is_ceil_of_diagonal_fraction():
    assert boundary_tolerance((480, 854)) == 8   # 0.008 * 979.65 = 7.84 -> 8
    assert boundary_tolerance((20, 20)) == 1     # 0.008 * 28.28 = 0.23 -> 1
    assert boundary_tolerance((100, 100)) == 2   # 0.008 * 141.42 = 1.13 -> 2


def test_seg2bmap_single_pixel_is_half_pixel_toward_origin():
    # A pixel at (5,5) differs from the east neighbour of (5,4), the south neighbour of (4,5), the
    # south-east neighbour of (4,4), and itself from its empty east neighbour: 4 boundary pixels.
    seg = np.zeros((20, 20), bool)
    seg[5, 5] = True
    assert set(zip(*np.nonzero(seg2bmap(seg)))) == {(4, 4), (4, 5), (5, 4), (5, 5)}


def test_seg2bmap_square_is_ring_of_box_shifted_up_left():
    # Square rows/cols 10..19: boundary = outline of the 11x11 box (9..19, 9..19) = 4*11 - 4 = 40 pixels.
    b = seg2bmap(box((100, 100), 10, 20, 10, 20))
    ring = box((100, 100), 9, 20, 9, 20) & ~box((100, 100), 10, 19, 10, 19)
    assert np.array_equal(b, ring) and int(b.sum()) == 40


def test_seg2bmap_last_row_column_and_corner():
    # Square in the bottom-right corner (rows/cols 15..19 of 20x20): the last row only compares east,
    # the last column only south, the corner is zeroed, so only row 14 (cols 14..19, 6 px) and column 14
    # (rows 15..19, 5 px) are boundary: 11 pixels, none along the image border.
    b = seg2bmap(box((20, 20), 15, 20, 15, 20))
    expected = {(14, c) for c in range(14, 20)} | {(r, 14) for r in range(15, 20)}
    assert set(zip(*np.nonzero(b))) == expected
    # A full-frame mask therefore has no boundary at all.
    assert not seg2bmap(np.ones((20, 20), bool)).any()


def test_boundary_f_edge_cases():
    empty = np.zeros((20, 20), bool)
    obj = box((20, 20), 5, 9, 5, 9)
    assert boundary_f(obj, empty) == 0.0   # no predicted boundary: P=1, R=0 -> F=0
    assert boundary_f(empty, obj) == 0.0   # no GT boundary: P=0, R=1 -> F=0
    assert boundary_f(empty, empty) == 1.0  # neither: P=R=1 -> F=1
    assert boundary_f(obj, obj) == 1.0
    # GT covering the whole frame has no boundary: any object prediction gets P=0, R=1 -> F=0,
    # while an all-ones prediction (no boundary either) gets F=1.
    full = np.ones((20, 20), bool)
    assert boundary_f(full, obj) == 0.0
    assert boundary_f(full, full) == 1.0


def test_boundary_f_one_pixel_objects():
    # 20x20 -> tolerance 1 (plus-shaped disk). GT pixel (5,5) -> bmap {(4,4),(4,5),(5,4),(5,5)}.
    gt = np.zeros((20, 20), bool)
    gt[5, 5] = True
    # Prediction (5,7) -> bmap {(4,6),(4,7),(5,6),(5,7)}; the GT bmap dilated by the plus reaches column 6,
    # so (4,6) and (5,6) match: P = 2/4; symmetrically R = 2/4; F = 2*0.25/1 = 0.5. No overlap: J = 0.
    pred = np.zeros_like(gt)
    pred[5, 7] = True
    assert boundary_f(gt, pred) == 0.5
    assert jaccard(gt, pred) == 0.0
    # Prediction (5,8): its bmap (columns 7, 8) is 2 away from the GT bmap's column 5: nothing matches, F = 0.
    far = np.zeros_like(gt)
    far[5, 8] = True
    assert boundary_f(gt, far) == 0.0


def test_boundary_f_shifted_square_by_hand():
    # 100x100 -> tolerance 2 (13-point disk). GT square rows/cols 10..19: ring rows {9,19} x cols 9..19 and
    # cols {9,19} x rows 9..19. Prediction shifted 4 columns right: ring rows {9,19} x cols 13..23 and
    # cols {13,23} x rows 9..19 (40 px).
    # Predicted pixels within distance 2 of the GT ring: top and bottom rows cols 13..21 (9 + 9), column 13
    # rows 10, 11, 17, 18 (within 2 of GT rows 9 / 19), column 23 none (4 from GT column 19) -> 22 of 40.
    # By mirror symmetry recall is also 22/40, so F = P = R = 0.55.
    gt = box((100, 100), 10, 20, 10, 20)
    pred = box((100, 100), 10, 20, 14, 24)
    assert boundary_f(gt, pred) == pytest.approx(0.55, abs=1e-15)
    # J: overlap rows 10..19 x cols 14..19 = 60, union 200 - 60 = 140 -> 3/7.
    assert jaccard(gt, pred) == pytest.approx(3 / 7, abs=1e-15)


def test_recall_and_mean_with_nan():
    # Recall counts values strictly above 0.5: [0.2, 0.5, 0.51, 0.9] -> 2 of 4.
    mean, recall, _ = object_statistics(np.array([0.2, 0.5, 0.51, 0.9]))
    assert mean == pytest.approx(2.11 / 4) and recall == 0.5
    # nanmean ignores NaN for the mean (0.75) but NaN > 0.5 is False and still counts: recall 1/3.
    mean, recall, _ = object_statistics(np.array([1.0, np.nan, 0.5]))
    assert mean == 0.75 and recall == pytest.approx(1 / 3)


def test_decay_bins_round_half_up():
    # n = 7: linspace(1, 7, 5) = [1, 2.5, 4, 5.5, 7]; +1e-10 rounds halves up -> [1, 3, 4, 6, 7] - 1.
    assert decay_bin_indices(7).tolist() == [0, 2, 3, 5, 6]
    # first bin v[0:3] -> (1 + 0.8 + 0.2)/3 = 2/3; last bin v[5:7] -> (0.1 + 0.3)/2 = 0.2; decay 2/3 - 0.2.
    v = np.array([1.0, 0.8, 0.2, 0.5, 0.5, 0.1, 0.3])
    assert object_statistics(v)[2] == pytest.approx(2 / 3 - 0.2, abs=1e-15)
    # n = 8: [1, 2.75, 4.5, 6.25, 8] -> [1, 3, 5, 6, 8] - 1; bins v[0:3] and v[5:8] of 0.9..0.2 -> 0.8 - 0.3.
    v = np.linspace(0.9, 0.2, 8)
    assert object_statistics(v)[2] == pytest.approx(0.5, abs=1e-12)


def test_decay_uint8_overflow_reproduced_by_default():
    # n = 300: indices [0, 75, 150, 224, 299]; the official uint8 cast wraps 299 to 43, so the last bin
    # v[224:44] is empty and the official decay is NaN. Without the overflow the last bin is v[224:300].
    assert decay_bin_indices(300).tolist() == [0, 75, 150, 224, 43]
    assert decay_bin_indices(300, reproduce_uint8_overflow=False).tolist() == [0, 75, 150, 224, 299]
    v = np.concatenate([np.ones(150), np.zeros(150)])
    assert math.isnan(object_statistics(v)[2])
    # intended: first bin v[0:76] all ones, last bin v[224:300] all zeros -> decay 1.
    assert object_statistics(v, reproduce_uint8_overflow=False)[2] == 1.0
