"""Label propagation through the key space (corrvos.eval.label_propagation): exact cases, the formula, the CLI."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import corrvos
from corrvos.errors import InputError
from corrvos.eval.label_propagation import LabelPropagator
from corrvos.imageops import aggregate

H, W = 64, 96  # multiples of 16: no padding, feature grid 4 x 6


def _model(arch: str):
    torch.manual_seed(0)
    return corrvos.build_model(arch).eval()


def _frames(n: int, moving: bool) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    base = (rng.random((H, W + 16 * n, 3)) * 255).astype(np.uint8)  # texture: distinct keys per cell
    return [np.ascontiguousarray(base[:, (5 * t if moving else 0):][:, :W]) for t in range(n)]


def _cell_mask() -> np.ndarray:
    """Two objects covering whole stride-16 cells, so the stride-16 grid represents them exactly."""
    m = np.zeros((H, W), np.uint8)
    m[16:48, 16:48] = 1
    m[0:16, 64:96] = 3  # a non-contiguous id: labels come back as the mask's ids
    return m


def _run(prop: LabelPropagator, frames, mask) -> list[np.ndarray]:
    return [labels for _, labels in prop.propagate(frames, mask)]


def _first_grid(mask: np.ndarray) -> torch.Tensor:
    """The first frame's label shares per stride-16 cell ``(K+1, N)``: the Tracker's first-frame probabilities
    (soft aggregation of the one-hot mask), averaged over each cell."""
    onehot = torch.stack([torch.from_numpy(mask == i).float() for i in (1, 3)])
    return F.avg_pool2d(torch.softmax(aggregate(onehot), dim=0)[None], 16)[0].flatten(1)


def _upsampled(grid: torch.Tensor) -> torch.Tensor:
    return F.interpolate(grid.view(1, -1, H // 16, W // 16), size=(H, W), mode="bilinear", align_corners=False)[0]


def _labels(prob: torch.Tensor) -> np.ndarray:
    return np.array([0, 1, 3], np.uint8)[prob.argmax(0).numpy()]


@pytest.mark.parametrize("arch", ["stcn-s", "xmem-s"])
def test_still_video_with_top1_reproduces_the_first_mask(arch):
    # On a repeated frame each query key equals the key of its own cell, which is its unique best match under
    # negative squared L2 (with XMem's shrinkage and selection too), so top-1 copies the labels cell by cell.
    frames, mask = _frames(4, moving=False), _cell_mask()
    with torch.inference_mode():
        out = _run(LabelPropagator(_model(arch), device="cpu", top_k=1), frames, mask)
    np.testing.assert_array_equal(out[0], mask)  # the given frame
    expected = _labels(_upsampled(_first_grid(mask)))  # the cells' labels, upsampled (corners rounded)
    assert (expected == mask).mean() > 0.97
    for labels in out[1:]:
        np.testing.assert_array_equal(labels, expected)


def test_radius_zero_keeps_every_cell_on_its_first_frame_labels():
    # With radius 0 a cell reads only itself in every memory frame, so the first frame's labels stay put
    # whatever the frames show.
    frames, mask = _frames(5, moving=True), _cell_mask()
    with torch.inference_mode():
        out = _run(LabelPropagator(_model("stcn-s"), device="cpu", radius=0), frames, mask)
    expected = _labels(_upsampled(_first_grid(mask)))
    for labels in out[1:]:
        np.testing.assert_array_equal(labels, expected)


def test_first_step_follows_the_formula_for_xmem():
    model = _model("xmem-s")
    frames, mask = _frames(2, moving=True), _cell_mask()
    top_k = 5
    prop = LabelPropagator(model, device="cpu", top_k=top_k)
    with torch.inference_mode():
        prop.step(frames[0], mask)
        got = prop.step(frames[1])
        feats = [model.encode_key(prop._prepare_image(t, f)[0]) for t, f in enumerate(frames)]

    # Expected, written out: anisotropic L2 with the memory's shrinkage and the query's selection, top-k softmax
    # over the memory, the first frame's label shares per cell, bilinear upsampling.
    k0, s0 = feats[0].key[0].flatten(1), feats[0].shrinkage[0].flatten(1)      # (C, N), (1, N)
    q, e = feats[1].key[0].flatten(1), feats[1].selection[0].flatten(1)        # (C, M)
    sim = -(s0.T[:, :, None] * e[None] * (k0.T[:, :, None] - q[None]) ** 2).sum(1) / math.sqrt(k0.shape[0])  # (N, M)
    vals, idx = sim.topk(top_k, dim=0)
    weights = torch.zeros_like(sim).scatter_(0, idx, torch.softmax(vals, dim=0))
    expected = _upsampled(_first_grid(mask) @ weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.sum(0), torch.ones(H, W), atol=1e-5)


def test_context_zero_reads_the_first_frame_only():
    model = _model("stcn-s")
    frames, mask = _frames(4, moving=True), _cell_mask()
    with torch.inference_mode():
        chained = LabelPropagator(model, device="cpu", context=0)
        chained.step(frames[0], mask)
        outs = [chained.step(f) for f in frames[1:]]
        direct = LabelPropagator(model, device="cpu", context=0)
        direct.step(frames[0], mask)
        torch.testing.assert_close(outs[-1], direct.step(frames[3]))  # frames 1 and 2 played no part
        with_context = LabelPropagator(model, device="cpu", context=2)
        with_context.step(frames[0], mask)
        last = [with_context.step(f) for f in frames[1:]][-1]
    assert not torch.allclose(last, outs[-1])  # and with context they do


def test_masks_after_the_first_frame_are_refused():
    prop = LabelPropagator(_model("stcn-s"), device="cpu")
    frames, mask = _frames(2, moving=False), _cell_mask()
    with pytest.raises(InputError, match="exactly one mask, on the first frame"):
        prop.step(frames[0])
    with torch.inference_mode():
        prop.step(frames[0], mask)
        with pytest.raises(InputError, match="exactly one mask"):
            prop.step(frames[1], mask)


def test_eval_cli_scores_label_propagation(tmp_path, capsys):
    from corrvos.eval.__main__ import main
    from tests.test_eval_correspondence import _tiny_davis2017

    ckpt = tmp_path / "xmem-s.safetensors"
    corrvos.save_model(_model("xmem-s"), ckpt)
    davis = tmp_path / "davis"
    _tiny_davis2017(davis)
    out = tmp_path / "out"
    rc = main(["--davis", str(davis), "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu", "--size", "0",
               "--label-propagation", "--context", "2", "--radius", "3", "--top-k", "4", "--workers", "1",
               "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "label propagation through the key space" in text and "toy_1" in text and "toy_2" in text
    assert sorted(p.name for p in (out / "toy").glob("*.png")) == [f"{t:05d}.png" for t in range(5)]
    lines = (out / "global_results.csv").read_text().splitlines()
    assert 0.0 <= float(lines[1].split(",")[0]) <= 1.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--checkpoint", "m.safetensors", "--label-propagation", "--record"], "excludes --record"),
        (["--checkpoint", "m.safetensors", "--label-propagation", "--correspondence"], "excludes --record, --correspondence"),
        (["--results", "r", "--label-propagation"], "needs --checkpoint"),
        (["--checkpoint", "m.safetensors", "--label-propagation", "--mem-every", "2"],
         "--mem-every configures the model's memory, which --label-propagation does not use"),
        (["--checkpoint", "m.safetensors", "--context", "3"], "--context sets the key-space label propagation"),
        (["--checkpoint", "m.safetensors", "--label-propagation", "--radius", "-1"], "--radius must be at least 0"),
    ],
)
def test_eval_cli_refuses_options_that_cannot_apply(tmp_path, extra, message, capsys):
    from corrvos.eval.__main__ import main

    assert main(["--davis", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
