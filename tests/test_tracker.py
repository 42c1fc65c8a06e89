"""Tracker: end to end (hand-made colour-tracking network and random-weight stcn-s / xmem-s), the
weights `matches` reports against the reads that really happened, memory schedules, bounded memory on
a long video, and bad input."""
import gc
import time

import numpy as np
import pytest
import torch

import corrvos
from corrvos.errors import InputError
from corrvos.inference.tracker import Tracker
from fake_vos_net import FakeVOSNet, moving_squares



SMALL_XMEM = dict(min_working_frames=2, max_working_frames=4, num_prototypes=16, max_long_term_elements=64)


def iou(pred, gt, obj):
    union = ((pred == obj) | (gt == obj)).sum()
    return ((pred == obj) & (gt == obj)).sum() / union


def track(tracker, frames, masks):
    """Step through frames with {t: mask}; returns label maps."""
    out = []
    for t, frame in enumerate(frames):
        prob = tracker.step(frame, masks.get(t), last=t == len(frames) - 1)
        assert prob.shape == (tracker.num_objects + 1, *frame.shape[:2])
        torch.testing.assert_close(prob.sum(0), torch.ones(frame.shape[:2]))
        out.append(tracker.labels_from(prob))
    return out


class ReadoutSpy:
    """Wraps a network's decode to keep the readout of every call (what the memory read produced)."""

    def __init__(self, net):
        self.readouts = []
        self._decode = net.decode
        net.decode = self

    def __call__(self, feats, readout, hidden=None, update_hidden=True):
        self.readouts.append(readout.clone())
        return self._decode(feats, readout, hidden, update_hidden)


@pytest.mark.parametrize("arch", ["stcn", "xmem"])
def test_two_objects_are_tracked_end_to_end(arch):
    frames, labels = moving_squares(30)
    tracker = Tracker(FakeVOSNet(arch), size=None)
    preds = track(tracker, frames, {0: labels[0]})
    assert tracker.object_ids == [1, 2]
    scores = np.array([[iou(p, g, o) for o in (1, 2)] for p, g in zip(preds[1:], labels[1:])])
    # The fake network decodes at stride 16, so ~0.7 IoU is its ceiling; losing an object gives ~0.
    assert scores.mean(0).min() > 0.6, scores.mean(0)
    assert scores.min() > 0.4, scores.min(0)


@pytest.mark.parametrize("arch", ["stcn", "xmem"])
def test_late_object_is_tracked(arch):
    frames, labels = moving_squares(30, late_object_at=8)
    late_mask = np.where(labels[8] == 3, 3, 0).astype(np.uint8)  # YouTube-VOS style: only the new object
    options = SMALL_XMEM if arch == "xmem" else {}
    tracker = Tracker(FakeVOSNet(arch), size=None, **options)
    preds = track(tracker, frames, {0: np.where(labels[0] == 3, 0, labels[0]), 8: late_mask})
    assert tracker.object_ids == [1, 2, 3]
    assert all((p == 3).sum() == 0 for p in preds[:8])
    scores = np.array([[iou(p, g, o) for o in (1, 2, 3)] for p, g in zip(preds[9:], labels[9:])])
    assert scores.mean(0).min() > 0.55, scores.mean(0)
    assert scores.min() > 0.3, scores.min(0)
    if arch == "xmem":
        assert tracker.memory_stats().consolidations >= 2  # the late object survives consolidation
        # Frames with a given mask stay in working memory for good (Cutie's permanent memory).
        assert tracker.memory.working_frame_indices[:2] == [0, 8]


@pytest.mark.parametrize("arch", ["stcn", "xmem"])
def test_matches_weights_are_the_weights_the_read_used(arch):
    frames, labels = moving_squares(24, late_object_at=7)
    net = FakeVOSNet(arch)
    spy = ReadoutSpy(net)
    tracker = Tracker(net, size=None, top_k=6, **(SMALL_XMEM if arch == "xmem" else {}))
    masks = {0: np.where(labels[0] == 3, 0, labels[0]), 7: np.where(labels[7] == 3, 3, 0).astype(np.uint8)}
    checked = 0
    rng = np.random.default_rng(0)
    for t, frame in enumerate(frames):
        tracker.step(frame, masks.get(t))
        # Right after a frame that did not become memory, the memory holds exactly what its read used.
        if t == 0 or t in masks or tracker.last_mem_t == t:
            continue
        readout = spy.readouts[-1][0]  # (K, Cv, h, w)
        values = tracker.memory.values()  # (K, Cv, N) in read order
        fh, fw = readout.shape[-2:]
        for _ in range(4):
            x, y = int(rng.integers(0, frame.shape[1])), int(rng.integers(0, frame.shape[0]))
            for channel, obj in enumerate(tracker.object_ids):
                m = tracker.matches(t, x, y, k=5, object_id=obj)
                row, col = tracker.geometry.to_feature(x, y)
                torch.testing.assert_close(values[channel] @ m.weights, readout[channel, :, row, col])
                assert int((m.weights > 0).sum()) <= 6  # top-k
                torch.testing.assert_close(m.heatmaps.sum(), torch.tensor(1.0))
                assert m.heatmaps.shape == (len(m.memory_frames), fh, fw)
                if obj == 3:  # the late object never reads frames before it appeared
                    assert float(m.weights[m.origin_frames < 7].sum()) == 0
                weights = [w for *_, w in m.top]
                assert weights == sorted(weights, reverse=True) and len(m.top) == 5
                assert all(0 <= px < frame.shape[1] and 0 <= py < frame.shape[0] for _, px, py, _ in m.top)
                checked += 1
        # The whole frame at once: every query position's weights reproduce the full readout.
        read = tracker.frame_read(t)
        for channel, obj in enumerate(tracker.object_ids):
            weights, _, _ = read.weights(obj)
            torch.testing.assert_close((values[channel] @ weights).view(-1, fh, fw), readout[channel])
    assert checked > 100
    if arch == "xmem":
        assert tracker.memory_stats().long_term_elements > 0  # long-term prototypes took part


def test_stcn_memory_frames_and_cap():
    frames, labels = moving_squares(23)
    tracker = Tracker(FakeVOSNet("stcn"), size=None, mem_every=5)
    track(tracker, frames, {0: labels[0], 7: labels[7]})
    # Absolute spacing, frames given a mask always, the last frame (20 would be, 22 is last) never.
    assert tracker.memory.frame_indices == [0, 5, 7, 10, 15, 20]
    capped = Tracker(FakeVOSNet("stcn"), size=None, mem_every=5, max_memory_frames=3)
    preds = track(capped, frames, {0: labels[0], 7: labels[7]})
    assert capped.memory.frame_indices == [0, 7, 20]
    assert capped.memory_stats().memory_frames == 3
    assert np.mean([iou(p, g, 1) for p, g in zip(preds, labels)]) > 0.6


def test_xmem_memory_frames_are_relative_and_last_is_not_memory():
    frames, labels = moving_squares(21)
    tracker = Tracker(FakeVOSNet("xmem"), size=None, mem_every=5, enable_long_term=False)
    track(tracker, frames, {0: labels[0], 7: labels[7]})
    assert tracker.memory.working_frame_indices == [0, 5, 7, 12, 17]  # 20 is last


def _upstream_hidden_updates(n: int, mem_every: int, deep_update_every: int, masks: set[int]):
    """XMem's InferenceCore.step rule, written out: per frame, (decoder updates the hidden state, memory frame
    deep-updates it), None where the part does not run. ``masks``: frames given a mask of every object."""
    sync = deep_update_every < 0
    last_mem, last_deep, out = 0, -deep_update_every, []
    for t in range(n):
        end = t == n - 1
        is_mem = (t - last_mem >= mem_every or t in masks) and not end
        is_deep = ((sync and is_mem) or (not sync and t - last_deep >= deep_update_every)) and not end
        is_normal = (not sync or not is_deep) and not end
        decoded = is_normal if t not in masks else None  # a mask of every object: nothing to segment
        deep = is_deep if is_mem else None
        if is_mem:
            last_mem = t
            if is_deep:
                last_deep = t
        out.append((decoded, deep))
    return out


@pytest.mark.parametrize("deep_update_every", [-1, 1, 3, 7])
def test_xmem_hidden_updates_follow_upstream_schedule(deep_update_every):
    frames, labels = moving_squares(16)
    net = FakeVOSNet("xmem")
    calls: dict[int, list] = {}
    decode, encode_value = net.decode, net.encode_value
    tracker = Tracker(net, size=None, mem_every=2, deep_update_every=deep_update_every, enable_long_term=False)

    def spy_decode(feats, readout, hidden=None, update_hidden=True):
        calls.setdefault(tracker.t, [None, None])[0] = update_hidden  # step sets t before it decodes
        return decode(feats, readout, hidden, update_hidden)

    def spy_encode_value(image, feats, hidden, masks, others, deep_update=True):
        calls.setdefault(tracker.t, [None, None])[1] = deep_update
        return encode_value(image, feats, hidden, masks, others, deep_update=deep_update)

    net.decode, net.encode_value = spy_decode, spy_encode_value
    track(tracker, frames, {0: labels[0], 9: labels[9]})
    got = [tuple(calls.get(t, [None, None])) for t in range(len(frames))]
    assert got == _upstream_hidden_updates(len(frames), 2, deep_update_every, {0, 9})


def test_deep_update_every_is_checked():
    with pytest.raises(ValueError, match="deep_update_every"):
        Tracker(FakeVOSNet("xmem"), deep_update_every=0)


def test_resize_returns_input_size():
    frames, labels = moving_squares(8)
    # Upscaling (short side 120 -> 240) gives the stride-16 fake network a finer grid: better masks.
    tracker = Tracker(FakeVOSNet("xmem"), size=240)
    preds = track(tracker, frames, {0: labels[0]})
    assert tracker.geometry.proc_size == (304, 240)
    assert preds[-1].shape == labels[-1].shape
    assert np.mean([iou(p, g, o) for p, g in zip(preds[1:], labels[1:]) for o in (1, 2)]) > 0.8
    m = tracker.matches(6, 60, 20)
    assert all(0 <= px < 120 and 0 <= py < 152 for _, px, py, _ in m.top)
    # Downscaling: torchvision's rounding (long side truncated), centred padding, output at input size.
    small = Tracker(FakeVOSNet("stcn"), size=96)
    preds = track(small, frames[:3], {0: labels[0]})
    assert small.geometry.proc_size == (121, 96) and small.geometry.pad == (0, 0, 3, 4)
    assert preds[-1].shape == labels[-1].shape


def test_propagate_yields_labels_and_resets():
    frames, labels = moving_squares(12, late_object_at=4)
    tracker = Tracker(FakeVOSNet("stcn"), size=None)
    out = list(tracker.propagate(iter(frames), np.where(labels[0] == 3, 0, labels[0]), masks={4: np.where(labels[4] == 3, 3, 0)}))
    assert [t for t, _ in out] == list(range(12))
    assert all(lab.dtype == np.uint8 and lab.shape == labels[0].shape for _, lab in out)
    assert set(np.unique(out[-1][1])) == {0, 1, 2, 3}
    assert 11 not in tracker.memory.frame_indices  # last frame known through the look-ahead
    again = list(tracker.propagate(frames[:3], labels[0]))
    assert len(again) == 3 and tracker.memory_stats().frames_processed == 3


@pytest.mark.parametrize("arch", ["stcn", "xmem"])
def test_complete_masks_remove_objects_a_correction_leaves_out(arch):
    frames, labels = moving_squares(12)
    correction = np.where(labels[5] == 2, 0, labels[5]).astype(np.uint8)  # object 2 erased at frame 5
    partial = list(Tracker(FakeVOSNet(arch), size=None).propagate(frames, labels[0], masks={5: correction}))
    complete = list(Tracker(FakeVOSNet(arch), size=None).propagate(frames, labels[0], masks={5: correction},
                                                                complete_masks=True))
    # By default the mask speaks only for object 1, so object 2 keeps being tracked there and after.
    assert (partial[5][1] == 2).sum() > 0 and (partial[8][1] == 2).sum() > 0
    # As a complete correction it says object 2 is gone: that frame is exactly the mask, and the frames
    # after it (which still remember object 2 from frame 0) see less of it than without the correction.
    assert np.array_equal(complete[5][1], correction)
    assert all((c == 2).sum() < (p == 2).sum() for (_, p), (_, c) in zip(partial[6:], complete[6:]))
    for (_, a), (_, b) in zip(partial[:5], complete[:5]):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["stcn-s", "xmem-s"])
def test_random_weight_small_models_run_and_matches_agree(name):
    torch.manual_seed(0)
    net = corrvos.build_model(name)
    spy = ReadoutSpy(net)
    frames, labels = moving_squares(7, height=64, width=64, square=20)
    tracker = Tracker(net, size=None)
    preds = track(tracker, frames, {0: labels[0]})
    assert preds[-1].shape == (64, 64)
    # Frame 5 is a memory frame; frame 6 is last: after frame 4 the memory is what frame 4 read.
    t = 4
    tracker = Tracker(net, size=None)
    spy.readouts.clear()
    track(tracker, frames[: t + 1], {0: labels[0]})
    m = tracker.matches(t, 30, 30, object_id=2)
    row, col = tracker.geometry.to_feature(30, 30)
    torch.testing.assert_close(tracker.memory.values()[1] @ m.weights, spy.readouts[-1][0, 1, :, row, col])


def test_bad_input_raises_one_sentence_errors():
    frames, labels = moving_squares(3)
    tracker = Tracker(FakeVOSNet("stcn"), size=None)
    with pytest.raises(InputError, match="empty"):
        tracker.step(frames[0], np.zeros_like(labels[0]))
    tracker.reset()
    with pytest.raises(InputError, match="first frame needs a mask"):
        tracker.step(frames[0])
    with pytest.raises(InputError, match="give a mask of the frame's size") as err:
        tracker.step(frames[0], labels[0][:-1])
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")
    # Rejected frames leave no trace: the same tracker starts the video normally.
    tracker.step(frames[0], labels[0])
    assert tracker.memory_stats().frames_processed == 1
    with pytest.raises(InputError, match="same size"):
        tracker.step(frames[1][:-16])
    with pytest.raises(InputError, match="not been processed"):
        tracker.matches(9, 0, 0)
    with pytest.raises(InputError, match="no memory read"):
        tracker.matches(0, 0, 0)
    tracker.step(frames[1])
    with pytest.raises(InputError, match="outside"):
        tracker.matches(1, 120, 0)
    with pytest.raises(InputError, match="ids between 1 and 255"):
        tracker.step(frames[2], labels[2], objects=[0])
    with pytest.raises(InputError, match="RGB"):
        Tracker(FakeVOSNet("stcn")).step(np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8))
    with pytest.raises(InputError, match="no frames"):
        next(Tracker(FakeVOSNet("stcn")).propagate([], labels[0]))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor)


@pytest.mark.slow
def test_long_video_memory_stays_bounded():
    """2,000 frames of 48x48 (3x3 features): WM/LT stay within their bounds and RSS stays flat."""
    num_frames, hw = 2000, 9
    frames, labels = moving_squares(50, height=48, width=48, square=16)
    options = dict(min_working_frames=3, max_working_frames=6, num_prototypes=8, max_long_term_elements=40)
    tracker = Tracker(FakeVOSNet("xmem"), size=None, match_cache_frames=20, **options)
    start = time.perf_counter()
    rss = {}
    most_wm = most_lt = 0
    for t in range(num_frames):
        tracker.step(frames[t % 50], labels[0] if t == 0 else None, last=t == num_frames - 1)
        stats = tracker.memory_stats()
        most_wm, most_lt = max(most_wm, stats.working_elements), max(most_lt, stats.long_term_elements)
        assert stats.working_elements <= options["max_working_frames"] * hw
        assert stats.long_term_elements <= options["max_long_term_elements"]
        if t + 1 == 400:
            tensors_at_400 = live_tensors()
        if (t + 1) % 200 == 0:
            rss[t + 1] = rss_mib()
            print(
                f"frame {t + 1:5d}: WM {stats.working_elements:3d} elements ({stats.memory_frames} frames), "
                f"LT {stats.long_term_elements:3d}, consolidations {stats.consolidations:3d}, RSS {rss[t + 1]:.1f} MiB"
            )
    elapsed = time.perf_counter() - start
    print(f"{num_frames} frames in {elapsed:.1f} s; peak WM {most_wm}, peak LT {most_lt}; "
          f"RSS at 200 frames {rss[200]:.1f} MiB, at 2000 frames {rss[2000]:.1f} MiB")
    assert most_lt > options["max_long_term_elements"] - options["num_prototypes"]  # the cap was exercised
    assert len(tracker._records) == 20
    # Nothing accumulates: the same number of live tensors (+- one consolidation's worth) and flat RSS.
    assert abs(live_tensors() - tensors_at_400) < 50
    assert rss[2000] - rss[400] < 8, rss
