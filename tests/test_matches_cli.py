"""`python -m corrvos.matches`: the app's click panel as files; same numbers as Tracker.matches; one-line errors."""
import json

import numpy as np
import pytest
from PIL import Image

import corrvos
from corrvos.io import load_frames, write_mask, write_video
from corrvos.matches import main, tile


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("matches")
    frames = []
    for t in range(6):
        f = np.full((64, 96, 3), (60, 90, 60), np.uint8)
        f[10:30, 10 + 4 * t:30 + 4 * t] = (230, 40, 40)
        f[40:60, 60:80] = (40, 40, 230)
        frames.append(f)
    write_video(d / "clip.mp4", frames, fps=8)
    mask = np.zeros((64, 96), np.uint8)
    mask[10:30, 10:30] = 3  # ids 3 and 7: reported as obj1 and obj2
    mask[40:60, 60:80] = 7
    write_mask(d / "mask.png", mask)
    ckpts = []
    for seed, name in ((0, "base"), (1, "corr")):
        torch.manual_seed(seed)
        ckpts.append(d / f"{name}.safetensors")
        corrvos.save_model(corrvos.build_model("stcn-s"), ckpts[-1])
    return {"dir": d, "video": d / "clip.mp4", "mask": d / "mask.png", "ckpts": ckpts}


def _argv(assets, out, *extra):
    return ["--checkpoint", *map(str, assets["ckpts"]), "--video", str(assets["video"]), "--mask", str(assets["mask"]),
            "--out", str(out), "--device", "cpu", "--size", "-1", "--mem-every", "1", *extra]


def test_writes_images_and_the_tracker_s_own_numbers(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(assets, out, "--frame", "4", "--point", "25,20", "70,50")) == 0
    printed = capsys.readouterr().out
    assert printed.count("base: frame 4, pixel (25, 20)") == 1 and "corr: frame 4, pixel (70, 50)" in printed

    report = json.loads((out / "matches.json").read_text())
    assert [(e["x"], e["y"]) for e in report] == [(25, 20), (70, 50)]
    for (x, y), entry in zip([(25, 20), (70, 50)], report):
        strip = np.asarray(Image.open(out / f"t00004_x{x}_y{y}.png"))
        assert strip.ndim == 3 and strip.shape[2] == 3
        for ckpt, model in zip(assets["ckpts"], entry["models"]):
            assert (out / f"t00004_x{x}_y{y}_{ckpt.stem}_memory.png").is_file()
            weights = model["weight_per_memory_frame"]
            assert set(weights) <= {"0", "1", "2", "3"} and sum(weights.values()) == pytest.approx(1, abs=1e-4)
            assert set(model["object_share"]) == {"background", "obj1", "obj2"}
            assert sum(model["object_share"].values()) == pytest.approx(1, abs=1e-4)

            # The same read, asked of a tracker run by hand.
            tracker = corrvos.Tracker(corrvos.load_model(ckpt, device="cpu"), device="cpu", size=None, mem_every=1)
            frames = load_frames(assets["video"]).frames
            first = (np.asarray(Image.open(assets["mask"])) > 0).astype(np.uint8)
            first[np.asarray(Image.open(assets["mask"])) == 7] = 2
            for _ in tracker.propagate(frames[:5], first):
                pass
            m = tracker.matches(4, x, y, k=len(model["top_matches"]))
            assert [(f, round(mx, 1), round(my, 1)) for f, mx, my, _ in m.top] == \
                [(t["frame"], t["x"], t["y"]) for t in model["top_matches"]]
            assert [t["weight"] for t in model["top_matches"]] == pytest.approx([w for *_, w in m.top], abs=1e-6)
    # Two checkpoints: one strip row each, so the comparison image is taller than one model's strip.
    assert np.asarray(Image.open(out / "t00004_x25_y20.png")).shape[0] > 200


def test_tile_lays_out_rows():
    images = [np.full((10, 20, 3), v, np.uint8) for v in (50, 100, 150)]
    grid = tile(images, columns=2, gap=4)
    assert grid.shape == (24, 44, 3)
    assert (grid[:10, :20] == 50).all() and (grid[:10, 24:] == 100).all() and (grid[14:, :20] == 150).all()
    assert (grid[14:, 24:] == 0).all()  # the missing cell stays black


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--frame", "0", "--point", "5,5"], "frame 0 reads no memory"),
        (["--frame", "9", "--point", "5,5"], "--frame 9 is past the end of the video, whose frames are 0..5."),
        (["--frame", "3", "--point", "96,5"], "--point 96,5 lies outside the 96x64 frame"),
        (["--frame", "3", "--point", "5;5"], "--point '5;5' is not of the form X,Y"),
        (["--frame", "3", "--point", "5,5", "--num-prototypes", "4"], "--num-prototypes configures XMem's memory"),
    ],
)
def test_bad_input_is_one_line(assets, tmp_path, extra, message, capsys):
    assert main(_argv(assets, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
