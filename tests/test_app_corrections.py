"""Correcting a frame in the app: which frames are recomputed, what the trackers remember, the errors."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from app.handlers import AppHandlers
from app.session import AppConfig, ModelCache, Session
from app_fixtures import make_checkpoints, make_clip, mask_layers
from corrvos import Tracker
from corrvos.io.masks import read_mask

N_FRAMES = 6
MODELS = ModelCache()
PAIR = ("stcn-s_baseline.safetensors", "stcn-s_corr.safetensors")


def _session(n: int, anno_t: int, given: list[int]) -> Session:
    frames = [np.zeros((4, 4, 3), np.uint8)] * n
    mask = np.ones((4, 4), np.uint8)
    return Session(frames=frames, names=[f"{t:05d}" for t in range(n)], fps=24.0, source="test", workdir=Path("."),
                   total_frames=n, anno_t=anno_t, given={t: mask for t in given})


def test_pass_plans_recompute_only_beyond_the_correction():
    s = _session(10, 3, [3])
    assert s.pass_plans(3) == [[3, 4, 5, 6, 7, 8, 9], [3, 2, 1, 0]]
    s = _session(10, 3, [3, 7])
    # The memory is primed with the annotated frame, then the correction; frames 4..6 keep their results.
    assert s.pass_plans(7) == [[3, 7, 8, 9]]
    s = _session(10, 3, [3, 5, 7])
    # A correction nearer the annotated frame re-runs through a later one, which keeps its mask.
    assert s.pass_plans(5) == [[3, 5, 6, 7, 8, 9]]
    s = _session(10, 3, [3, 1, 7])
    # Backward: corrections on the other side are not in this pass's memory.
    assert s.pass_plans(1) == [[3, 1, 0]]
    assert _session(10, 3, [3, 9]).pass_plans(9) == []  # the last frame: nothing left to propagate
    assert _session(10, 0, [0]).pass_plans(0) == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]


@pytest.fixture(scope="module")
def assets(davis2016_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("app_corr")
    video, mask, gt = make_clip(davis2016_root, root / "clip", N_FRAMES)
    make_checkpoints(root / "checkpoints")
    return {"video": video, "mask": mask, "gt": gt, "ckpt_dir": root / "checkpoints", "root": root}


def _handlers(assets, **kw) -> AppHandlers:
    config = AppConfig(checkpoints=assets["ckpt_dir"], device="cpu", size=0, work_root=assets["root"] / "work", **kw)
    return AppHandlers(config, MODELS)


def _propagated(assets, anno_t: int = 0, **kw) -> AppHandlers:
    h = _handlers(assets, **kw)
    h.load_video(str(assets["video"]))
    mask_file = str(assets["gt"] / f"{anno_t:05d}.png")
    outs = list(h.propagate(None, mask_file, anno_t, *PAIR))
    assert "Done" in outs[-1][3]
    return h


def test_correction_recomputes_the_frames_after_it_with_both_masks_in_memory(assets):
    h = _propagated(assets)
    session = h.store.get("local")
    before = {slot: [lab.copy() for lab in session.runs[slot].labels] for slot in ("A", "B")}

    editor, status = h.edit_frame(3, "A")
    assert np.array_equal(editor["background"], session.frames[3])
    # The editor holds A's result of frame 3, one layer per object.
    from app.inputs import labels_from_layers
    shown = labels_from_layers(editor["layers"])
    assert np.array_equal(shown if shown is not None else np.zeros_like(before["A"][3]), before["A"][3])
    assert "Re-propagate" in status

    fixed = read_mask(assets["gt"] / "00003.png")
    editor["layers"] = mask_layers(fixed)
    outs = list(h.correct(editor))
    final_status = outs[-1][3]
    assert "Done: 2 of 6 frames propagated from frame 3" in final_status and "corrected frame(s) 3" in final_status
    assert outs[-1][4].value == 3  # the frame slider jumps to the correction

    for slot in ("A", "B"):
        run = session.runs[slot]
        assert run.complete
        assert np.array_equal(run.labels[3], fixed)  # both models get the same correction
        for t in range(3):
            assert np.array_equal(run.labels[t], before[slot][t])  # before the correction: untouched
        assert [p.frames for p in run.passes] == [[0, 1, 2, 3, 4, 5], [0, 3, 4, 5]]

        # Oracle: a fresh tracker given the annotation and the correction, then frames 4 and 5.
        model = MODELS.get(run.checkpoint, "cpu")
        tracker = Tracker(model, device="cpu", size=None)
        tracker.step(session.frames[0], session.given[0], [1])
        tracker.step(session.frames[3], fixed, [1])
        expected4 = tracker.labels_from(tracker.step(session.frames[4]))
        expected5 = tracker.labels_from(tracker.step(session.frames[5], last=True))
        assert np.array_equal(run.labels[4], expected4) and np.array_equal(run.labels[5], expected5)

    # The editor still holds frame 3: Propagate would take it for the annotation, so it is refused; the
    # correction can be refined and run again instead (same frames, same result for the same mask).
    with pytest.raises(gr.Error, match="(?i)holds frame 3 for a correction"):
        list(h.propagate(None, None, 0, *PAIR))
    again = list(h.correct(editor))
    assert "Done: 2 of 6 frames propagated from frame 3" in again[-1][3]
    assert np.array_equal(session.runs["B"].labels[4], expected4)
    assert [p.frames for p in session.runs["A"].passes] == [[0, 1, 2, 3, 4, 5], [0, 3, 4, 5]]

    # Frame 4 now reads its memory from the annotated frame 0 and the correction at frame 3.
    gal_a, _, _, text = h.affinity_at(4, 80, 50)
    assert {caption.split(" · ")[1] for _, caption in gal_a} == {"memory frame 0", "memory frame 3"}
    with pytest.raises(gr.Error, match="(?i)corrected frame"):
        h.affinity_at(3, 80, 50)
    # Frames before the correction are still explained by the first pass.
    gal_a, _, _, _ = h.affinity_at(2, 80, 50)
    assert all("memory frame 3" not in caption for _, caption in gal_a)

    # A second correction nearer the annotated frame re-runs through the first one, which keeps its mask;
    # every earlier pass is then wholly superseded and dropped (their caches would pile up).
    h.edit_frame(1, "B")
    one = read_mask(assets["gt"] / "00001.png")
    outs = list(h.correct({"background": None, "layers": mask_layers(one), "composite": None}))
    assert "corrected frame(s) 1, 3" in outs[-1][3] and "Done: 3 of 6 frames" in outs[-1][3]
    assert [p.frames for p in session.runs["A"].passes] == [[0, 1, 2, 3, 4, 5]]
    gal_a, _, _, _ = h.affinity_at(2, 80, 50)  # now read from the annotation and the correction at frame 1
    assert {caption.split(" · ")[1] for _, caption in gal_a} == {"memory frame 0", "memory frame 1"}
    assert np.array_equal(session.runs["A"].labels[3], fixed) and np.array_equal(session.runs["B"].labels[1], one)

    # A new annotation starts over: the corrections are gone.
    h.set_anno_frame(0)
    outs = list(h.propagate(None, str(assets["mask"]), 0, *PAIR))
    assert "corrected" not in outs[-1][3] and list(session.given) == [0]
    assert [p.frames for p in session.runs["A"].passes] == [[0, 1, 2, 3, 4, 5]]


def test_backward_correction_and_the_last_frame(assets):
    h = _propagated(assets, anno_t=2, max_frames=5)
    session = h.store.get("local")
    after_anno = [lab.copy() for lab in session.runs["B"].labels]
    h.edit_frame(1, "B")
    fixed = read_mask(assets["gt"] / "00001.png")
    outs = list(h.correct({"background": None, "layers": mask_layers(fixed), "composite": None}))
    assert "Done: 1 of 5 frames propagated from frame 1" in outs[-1][3]
    run = session.runs["B"]
    assert [p.frames for p in run.passes][-1] == [2, 1, 0]
    assert np.array_equal(run.labels[1], fixed)
    for t in (2, 3, 4):
        assert np.array_equal(run.labels[t], after_anno[t])
    # Correcting the last frame only replaces its mask: nothing lies beyond it.
    h.edit_frame(4, "B")
    last = read_mask(assets["gt"] / "00004.png")
    outs = list(h.correct({"background": None, "layers": mask_layers(last), "composite": None}))
    assert "Done: 0 of 5 frames" in outs[-1][3]
    assert np.array_equal(session.runs["A"].labels[4], last) and np.array_equal(run.labels[4], last)
    assert sorted(session.given) == [1, 2, 4]
    # Soft mattes only where the model predicted: frame 4 lost its own when the user corrected it.
    assert sorted(run.soft) == sorted(session.runs["A"].soft) == [0, 3]
    assert h.export().endswith(".zip")


def test_correction_can_add_an_object_from_that_frame_on(assets):
    h = _propagated(assets)
    session = h.store.get("local")
    h.edit_frame(2, "A")
    fixed = read_mask(assets["gt"] / "00002.png")
    fixed[5:25, 5:30] = 4  # drawn on the obj4 layer while one object is tracked: it becomes object 2
    outs = list(h.correct({"background": None, "layers": mask_layers(fixed), "composite": None}))
    assert "2 object(s)" in outs[-1][3] and session.num_objects == 2
    expected = np.where(fixed == 4, 2, fixed)
    for slot in ("A", "B"):
        labels = session.runs[slot].labels
        assert np.array_equal(labels[2], expected)
        assert all(2 not in np.unique(labels[t]) for t in (0, 1))  # it did not exist before its frame
        assert all(set(np.unique(labels[t])) <= {0, 1, 2} for t in (3, 4, 5))
    # The new object is drawn and summed like any other: chart traces, and the export has every frame.
    names = [trace.name for trace in outs[-1][7].data]
    assert "A obj2" in names and "B obj2" in names
    assert h.export().endswith(".zip")


def test_correction_errors_are_one_sentence(assets):
    h = _handlers(assets, max_frames=3)
    h.load_video(str(assets["video"]))
    with pytest.raises(gr.Error, match="(?i)no results yet"):
        h.edit_frame(1, "B")
    h = _propagated(assets, max_frames=3)
    with pytest.raises(gr.Error, match="(?i)no frame is being corrected"):
        list(h.correct({"background": None, "layers": [], "composite": None}))
    h.edit_frame(1, "B")
    with pytest.raises(gr.Error, match="(?i)marks no object"):
        list(h.correct({"background": None, "layers": [], "composite": None}))
    # While a correction is open, Propagate would take the corrected frame for the annotation: refused.
    with pytest.raises(gr.Error, match="(?i)holds frame 1 for a correction"):
        list(h.propagate(None, str(assets["mask"]), 0, *PAIR))
    h.set_anno_frame(0)
    assert "Done" in list(h.propagate(None, str(assets["mask"]), 0, *PAIR))[-1][3]


def test_tracker_options_reach_both_models_with_their_architecture(assets):
    # python -m app --mem-every 2 --top-k 4 --max-memory-frames 3 --num-prototypes 8: the XMem option is
    # dropped for these STCN models instead of failing, since A and B may be of different architectures.
    h = _propagated(assets, tracker_options={"mem_every": 2, "top_k": 4, "max_memory_frames": 3, "num_prototypes": 8})
    assert "**tracker:** mem_every=2, top_k=4, max_memory_frames=3, num_prototypes=8" in h.header()
    session = h.store.get("local")
    for slot in ("A", "B"):
        tracker = session.runs[slot].passes[-1].tracker
        assert (tracker.mem_every, tracker.top_k, tracker.memory.max_frames) == (2, 4, 3)
        assert tracker.memory.num_frames <= 3
