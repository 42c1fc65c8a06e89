"""The app's handlers called directly (no server) on a few frames of a real DAVIS-2016 clip."""
from __future__ import annotations

import time
import zipfile

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from app.handlers import AppHandlers
from app.session import AppConfig, ModelCache, default_checkpoints, list_checkpoints
from app_fixtures import SIZE, make_checkpoints, make_clip, mask_layers
from corrvos.io.masks import read_mask

N_FRAMES = 6
MODELS = ModelCache()  # shared by the tests' handler instances: each checkpoint is read once


@pytest.fixture(scope="module")
def assets(davis2016_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    video, mask, gt = make_clip(davis2016_root, root / "clip", N_FRAMES)
    ckpts = make_checkpoints(root / "checkpoints")
    return {"video": video, "mask": mask, "gt": gt, "ckpt_dir": root / "checkpoints", "ckpts": ckpts, "root": root}


def _handlers(assets, **kw) -> AppHandlers:
    kw.setdefault("size", 0)  # the tiny clip at its own size
    config = AppConfig(checkpoints=assets["ckpt_dir"], device="cpu", work_root=assets["root"] / "work", **kw)
    return AppHandlers(config, MODELS)


def _run(h: AppHandlers, editor=None, mask_file=None, anno_t=0, gt=None):
    outs = list(h.propagate(editor, mask_file, anno_t, "stcn-s_baseline.safetensors", "stcn-s_corr.safetensors", gt))
    return outs


@pytest.fixture(scope="module")
def propagated(assets):
    """One handler instance after upload + propagation with the mask drawn on the editor layers."""
    h = _handlers(assets, preview_every=1)
    editor, slider, info = h.load_video(str(assets["video"]))
    mask = read_mask(assets["mask"])
    editor["layers"] = mask_layers(mask)
    start = time.perf_counter()
    outs = _run(h, editor=editor, gt=[str(p) for p in sorted(assets["gt"].glob("*.png"))])
    print(f"propagate A+B over {N_FRAMES} frames of {SIZE[0]}x{SIZE[1]}: {time.perf_counter() - start:.2f} s")
    return h, outs


def test_load_video_fills_editor_and_slider(assets):
    h = _handlers(assets)
    editor, slider, info = h.load_video(str(assets["video"]))
    assert editor["background"].shape == (SIZE[1], SIZE[0], 3)
    assert editor["layers"] == []
    assert slider.maximum == N_FRAMES - 1
    assert f"{N_FRAMES} frames" in info and f"{SIZE[0]}x{SIZE[1]}" in info


def test_frame_cap_cuts_and_says_so(assets):
    h = _handlers(assets, max_frames=4)
    _, slider, info = h.load_video(str(assets["video"]))
    assert slider.maximum == 3
    assert f"{N_FRAMES} frames" in info and "first 4" in info
    assert "frame cap" in h.header()


def test_checkpoint_listing_and_defaults(assets, tmp_path):
    names = list_checkpoints(assets["ckpt_dir"])
    assert names == ["stcn-s_baseline.safetensors", "stcn-s_corr.safetensors"]
    assert default_checkpoints(["x.pth", "y.safetensors", "z.safetensors"]) == ("x.pth", "y.safetensors")
    shipped = ["stcn-s_baseline_cpu.safetensors", "stcn-s_corr_cpu.safetensors", "stcn.pth",
               "xmem-s_baseline.safetensors", "xmem-s_corr.safetensors"]
    assert default_checkpoints(shipped) == ("stcn-s_baseline_cpu.safetensors", "stcn-s_corr_cpu.safetensors")
    assert default_checkpoints(shipped[2:]) == ("xmem-s_baseline.safetensors", "xmem-s_corr.safetensors")
    assert default_checkpoints(["a_baseline.pth", "b_corr.pth"]) == ("a_baseline.pth", "b_corr.pth")
    assert default_checkpoints([]) == (None, None)
    message = AppHandlers(AppConfig(checkpoints=assets["ckpt_dir"], device="cpu")).checkpoint_message(*names)
    assert "**A:** stcn-s" in message and "**B:** stcn-s" in message
    empty = AppHandlers(AppConfig(checkpoints=tmp_path, device="cpu", weights_cache=None))
    assert "No checkpoints found" in empty.checkpoint_message()
    assert "python -m corrvos.weights fetch" in empty.checkpoint_message()


def test_official_checkpoints_in_the_weights_cache_are_listed_and_load(assets, tmp_path):
    """Files fetched by `python -m corrvos.weights` appear as official/<file> beside the folder's own."""
    import shutil

    cache = tmp_path / "weights"
    cache.mkdir()
    shutil.copy(assets["ckpts"][0], cache / "stcn.pth.safetensors")
    (cache / "stcn.pth.part").write_bytes(b"half a download")  # never listed
    h = AppHandlers(AppConfig(checkpoints=assets["ckpt_dir"], device="cpu", weights_cache=cache), MODELS)
    names, a, b = h.checkpoint_choices()
    assert names == ["stcn-s_baseline.safetensors", "stcn-s_corr.safetensors", "official/stcn.pth.safetensors"]
    assert (a, b) == ("stcn-s_baseline.safetensors", "stcn-s_corr.safetensors")
    assert h._checkpoint_path("official/stcn.pth.safetensors", "A") == cache / "stcn.pth.safetensors"
    assert "**B:** stcn-s" in h.checkpoint_message(a, "official/stcn.pth.safetensors")


def test_propagate_previews_then_full_results(assets, propagated):
    h, outs = propagated
    skip = type(gr.skip())
    previews = [o for o in outs[:-1] if not isinstance(o[0], skip)]
    assert len(previews) >= 2  # live previews (preview_every=1) before the final result
    assert all(isinstance(o[4], skip) for o in outs[:-1])  # the slider is only set at the end
    assert "Propagating" in previews[0][3]
    view_a, view_b, diff, status, slider, video_a, video_b, fig = outs[-1]
    assert "Done" in status and slider.maximum == N_FRAMES - 1
    assert view_a.label == "A: stcn-s_baseline.safetensors" and view_a.value is not None
    assert diff.shape == (SIZE[1], SIZE[0], 3)
    session = h.store.get("local")
    for slot in ("A", "B"):
        run = session.runs[slot]
        assert run.complete and len(run.labels) == N_FRAMES
        assert all(lab.shape == (SIZE[1], SIZE[0]) for lab in run.labels)
        assert run.video.is_file() and run.video.stat().st_size > 0
    assert video_a.endswith(".mp4") and video_b.endswith(".mp4")
    names = [trace.name for trace in fig.data]
    assert "IoU A vs B" in names and any(n.startswith("J ") for n in names)
    # The annotated frame keeps the user's mask exactly.
    assert np.array_equal(session.runs["A"].labels[0], read_mask(assets["mask"]))


def test_show_frame_and_click_heatmaps(propagated):
    h, _ = propagated
    a, b, diff = h.show_frame(3)
    assert a.shape == b.shape == diff.shape == (SIZE[1], SIZE[0], 3)
    start = time.perf_counter()
    evt = gr.SelectData(target=None, data={"index": [80, 50], "value": None})
    gal_a, gal_b, strip, text, x, y = h.click(3, evt)
    print(f"click -> heatmaps: {time.perf_counter() - start:.3f} s")
    assert (x, y) == (80, 50)
    session = h.store.get("local")
    mem_frames = session.runs["A"].passes[0].tracker.matches(3, 80, 50).memory_frames
    assert len(gal_a) == len(mem_frames) >= 1 and len(gal_b) >= 1
    panel, caption = gal_a[0]
    assert panel.ndim == 3 and "memory frame 0" in caption
    assert strip.ndim == 3 and strip.shape[0] > 200
    assert "Entropy" in text and "obj1" in text and text.count("Weight per memory frame") == 2
    # The API twin gives the same readout as the click.
    twin = h.affinity_at(3, 80, 50)
    assert twin[3] == text


def test_click_errors_are_one_sentence(propagated):
    h, _ = propagated
    with pytest.raises(gr.Error, match="(?i)annotated frame"):
        h.affinity_at(0, 10, 10)
    with pytest.raises(gr.Error, match="(?i)outside"):
        h.affinity_at(2, 10_000, 10)


def test_export_zip_has_one_png_per_frame_and_videos(propagated):
    h, _ = propagated
    path = h.export()
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        for slot in ("A_stcn-s_baseline", "B_stcn-s_corr"):
            pngs = sorted(n for n in names if n.startswith(slot + "/") and n.endswith(".png"))
            assert pngs == [f"{slot}/{t:05d}.png" for t in range(N_FRAMES)]
        assert sum(n.endswith(".mp4") for n in names) == 2
        # One black-and-white matte per object and frame, equal to that object's pixels in the palette PNG.
        mattes = sorted(n for n in names if n.startswith("B_stcn-s_corr_mattes/"))
        assert mattes == [f"B_stcn-s_corr_mattes/obj1/{t:05d}.png" for t in range(N_FRAMES)]
        with zf.open(mattes[2]) as f, zf.open(f"B_stcn-s_corr/{2:05d}.png") as g:
            matte, palette = np.asarray(Image.open(f)), np.asarray(Image.open(g))
            assert matte.dtype == np.uint8 and set(np.unique(matte)) <= {0, 255}
            assert np.array_equal(matte == 255, palette == 1)
        # Soft mattes: the model's probability on predicted frames, the user's hard mask on the given frame.
        soft = sorted(n for n in names if n.startswith("B_stcn-s_corr_soft_mattes/"))
        assert soft == [f"B_stcn-s_corr_soft_mattes/obj1/{t:05d}.png" for t in range(N_FRAMES)]
        with zf.open(soft[0]) as f, zf.open(mattes[0]) as g:
            assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(g)))
        with zf.open(soft[2]) as f, zf.open(f"B_stcn-s_corr/{2:05d}.png") as g:
            prob, palette = np.asarray(Image.open(f)).astype(int), np.asarray(Image.open(g))
            assert len(np.unique(prob)) > 2  # not a hard mask
            # One object: it wins a pixel exactly where its probability passes one half.
            assert (prob[palette == 1] >= 127).all() and (prob[palette == 0] <= 128).all()
        with zf.open(f"A_stcn-s_baseline/{N_FRAMES - 1:05d}.png") as f:
            img = Image.open(f)
            assert img.mode == "P" and img.size == SIZE


@pytest.mark.parametrize("size, expected", [(None, "preferred"), (0, None), (64, 64)])
def test_size_reaches_each_tracker_as_in_the_command_line(assets, size, expected):
    # The app's --size means what it means in infer and eval: unset = each checkpoint's training scale.
    h = _handlers(assets, size=size, max_frames=2)
    h.load_video(str(assets["video"]))
    _run(h, mask_file=str(assets["mask"]))
    for run in h.store.get("local").runs.values():
        tracker = run.passes[-1].tracker
        assert tracker.size == (tracker.model.preferred_size if expected == "preferred" else expected)
        assert run.labels[1].shape == (SIZE[1], SIZE[0])  # results always at the input size


def test_backward_from_a_middle_frame_with_mask_file(assets):
    h = _handlers(assets, max_frames=4)
    h.load_video(str(assets["video"]))
    # The GT mask of frame 2, used as the annotation of frame 2: frames 0..1 come from the backward pass.
    outs = _run(h, mask_file=str(assets["gt"] / "00002.png"), anno_t=2)
    assert "annotated frame 2" in outs[-1][3]
    session = h.store.get("local")
    assert session.runs["A"].complete and session.runs["B"].complete
    assert [p.frames for p in session.runs["A"].passes] == [[2, 3], [2, 1, 0]]
    gal_a, gal_b, strip, text = h.affinity_at(0, 80, 50)
    # Frame 0 was read (backward) from the annotated frame 2, which is memory frame 0 of that pass.
    assert [caption for _, caption in gal_a] == ["A · memory frame 2 · weight 1.000"]


def test_bad_inputs_raise_gr_error_and_app_keeps_working(assets, tmp_path):
    h = _handlers(assets, max_frames=3)
    with pytest.raises(gr.Error, match="(?i)no video is loaded"):
        _run(h, mask_file=str(assets["mask"]))
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video")
    with pytest.raises(gr.Error):
        h.load_video(str(text))
    h.load_video(str(assets["video"]))
    with pytest.raises(gr.Error, match="(?i)no object is marked"):
        _run(h, editor={"background": None, "layers": [], "composite": None})
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((SIZE[1], SIZE[0]), np.uint8)).save(empty)
    with pytest.raises(gr.Error, match="(?i)no object pixels"):
        _run(h, mask_file=str(empty))
    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.full((10, 12), 255, np.uint8)).save(wrong)
    with pytest.raises(gr.Error, match="(?i)12x10|10x12"):
        _run(h, mask_file=str(wrong))
    corrupt = assets["root"] / "bad_ckpt"
    corrupt.mkdir(exist_ok=True)
    (corrupt / "broken.safetensors").write_bytes(b"\x00" * 100)
    bad = AppHandlers(AppConfig(checkpoints=corrupt, device="cpu", size=0, work_root=assets["root"] / "w2"), MODELS)
    bad.load_video(str(assets["video"]))
    with pytest.raises(gr.Error) as info:
        list(bad.propagate(None, str(assets["mask"]), 0, "broken.safetensors", "broken.safetensors"))
    assert "broken" in str(info.value) or "checkpoint" in str(info.value).lower()
    with pytest.raises(gr.Error, match="(?i)does not exist"):
        list(bad.propagate(None, str(assets["mask"]), 0, "gone.safetensors", "broken.safetensors"))
    with pytest.raises(gr.Error, match="(?i)nothing to export"):
        h.export()
    # After all that, the same handler instance still works.
    outs = _run(h, mask_file=str(assets["mask"]))
    assert "Done" in outs[-1][3]


def test_example_loads_with_its_mask_on_the_editor(assets):
    h = _handlers(assets, max_frames=3)
    editor, slider, info = h.load_example("blackswan")
    assert "DAVIS" in info
    assert editor["background"].shape == (480, 854, 3)
    # The example's object on the first layer; the other layers stay free for more objects.
    assert len(editor["layers"]) == 5 and editor["layers"][0][..., 3].any()
    assert not any(layer[..., 3].any() for layer in editor["layers"][1:])
    assert h.set_anno_frame(1)["layers"] == []
