"""corrvos.inference.video_session: the library's video session that the app and corrvos.infer both use."""
import numpy as np
import pytest

from corrvos.errors import InputError
from corrvos.inference.tracker import Tracker
from corrvos.inference.video_session import VideoSession, pass_plans
from fake_vos_net import FakeVOSNet, moving_squares

N = 8


@pytest.fixture(scope="module")
def clip():
    return moving_squares(N)


def _trackers(*keys, arch="stcn"):
    return {k: (lambda a=arch, s=i: Tracker(FakeVOSNet(a, seed=s), device="cpu")) for i, k in enumerate(keys)}


def test_pass_plans():
    assert pass_plans(10, 3, [3], 3) == [[3, 4, 5, 6, 7, 8, 9], [3, 2, 1, 0]]
    assert pass_plans(10, 3, [3, 7], 7) == [[3, 7, 8, 9]]
    assert pass_plans(10, 3, [3], 3, directions=(-1, 1)) == [[3, 2, 1, 0], [3, 4, 5, 6, 7, 8, 9]]
    assert pass_plans(10, 9, [9], 9, directions=(1,)) == []
    assert pass_plans(10, 9, [9], 9, directions=(1,), keep_last=True) == [[9]]


def test_models_advance_in_lock_step_and_given_frames_keep_their_masks(clip):
    frames, labels = clip
    s = VideoSession(frames)
    s.annotate(2, labels[2])
    steps = list(s.propagate(_trackers("A", "B")))
    keys = [st.key for st in steps]
    assert keys[:4] == ["A", "B", "A", "B"] and len(steps) == 2 * (N - 1) == steps[-1].total == steps[-1].done
    assert sorted({st.t for st in steps}) == [t for t in range(N) if t != 2]
    for key in "AB":
        run = s.runs[key]
        assert run.complete and run.labels[2] is labels[2]
        assert [p.frames for p in run.passes] == [[2, 3, 4, 5, 6, 7], [2, 1, 0]]
        found = s.tracker_for(key, 5)
        assert found is not None and found[0].frames[found[1]] == 5
        assert s.tracker_for(key, 2) is None  # given frames were not predicted
    # The fake network segments its own colour cells: the squares are found again.
    assert (s.runs["A"].labels[7] == labels[7]).mean() > 0.9


def test_a_correction_repropagates_only_beyond_it(clip):
    frames, labels = clip
    s = VideoSession(frames)
    s.annotate(0, labels[0])
    list(s.propagate(_trackers("A")))
    before = list(s.runs["A"].labels)
    fixed = np.zeros_like(labels[4])
    fixed[labels[4] == 1] = 1  # object 2 removed on frame 4
    s.correct(4, fixed)
    list(s.propagate(_trackers("A"), start=4))
    run = s.runs["A"]
    assert all(run.labels[t] is before[t] for t in range(4))  # untouched before the correction
    assert run.labels[4] is fixed
    assert all(run.labels[t] is not before[t] for t in range(5, N))  # recomputed by the second pass
    assert s.tracker_for("A", 6)[0] is run.passes[-1] and s.tracker_for("A", 2)[0] is run.passes[0]
    assert [p.frames for p in run.passes] == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 4, 5, 6, 7]]


def test_without_complete_masks_later_masks_add_objects_and_are_results(clip):
    frames, labels = clip
    only1 = np.where(labels[0] == 1, 1, 0).astype(np.uint8)
    later = np.where(labels[3] == 2, 2, 0).astype(np.uint8)  # object 2 joins at frame 3
    s = VideoSession(frames, given={0: only1, 3: later}, anno_t=0, complete_masks=False)
    out = {st.t: st for st in s.propagate(_trackers("A"), directions=(1,))}
    assert sorted(out) == list(range(N))  # the given frames are results too
    assert set(np.unique(s.runs["A"].labels[3])) == {0, 1, 2}  # frame 3: object 1 tracked beside the new mask
    assert (s.runs["A"].labels[6] == 2).any()



def test_backward_and_forward_from_one_frame_compute_it_once(clip):
    frames, labels = clip
    s = VideoSession(frames, given={3: labels[3]}, anno_t=3, complete_masks=False)
    back = [st.t for st in s.propagate(_trackers("A"), directions=(-1,))]
    forward = [st.t for st in s.propagate(_trackers("A"), directions=(1,))]
    assert back == [2, 1, 0] and forward == list(range(3, N))

def test_a_mask_on_the_last_frame_is_still_a_result(clip):
    frames, labels = clip
    s = VideoSession(frames, given={N - 1: labels[N - 1]}, anno_t=N - 1, complete_masks=False, keep_labels=False)
    steps = list(s.propagate(_trackers("A"), directions=(1,)))
    assert [st.t for st in steps] == [N - 1]
    assert s.runs["A"].labels == [None] * N  # keep_labels=False stores nothing


def test_refusals(clip):
    frames, labels = clip
    s = VideoSession(frames)
    with pytest.raises(InputError, match="Annotate a frame"):
        s.correct(3, labels[3])
    with pytest.raises(InputError, match="outside the clip"):
        s.annotate(N, labels[0])
    s.annotate(0, labels[0])
    with pytest.raises(InputError, match="Frame 5 has no mask"):
        next(s.propagate(_trackers("A"), start=5))
