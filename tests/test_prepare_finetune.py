"""Fine-tuning on your own video: prepare (video + mask folder -> DAVIS-layout sequence), then train.py --load on it."""
from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from corrvos.errors import InputError
from corrvos.io.masks import read_mask, write_mask
from corrvos.training.prepare import main, prepare
from training_data_helpers import object_frames

N = 8


@pytest.fixture()
def own_clip(tmp_path):
    """A frame folder (PNG, lossless) of two moving objects and its masks: 6 annotated frames, one of them empty."""
    frames, labels = object_frames(N, 72, 112, objects=2)
    video, masks = tmp_path / "walk", tmp_path / "masks"
    video.mkdir()
    masks.mkdir()
    for t, (f, lab) in enumerate(zip(frames, labels)):
        cv2.imwrite(str(video / f"{t:05d}.png"), f[:, :, ::-1])
        if t in (0, 1, 2, 3, 5):
            write_mask(masks / f"{t:05d}.png", lab)
    write_mask(masks / "00006.png", np.zeros_like(labels[6]))  # objects out of view: still a training frame
    return video, masks, labels


def test_prepare_writes_the_annotated_frames_shrunk(own_clip, tmp_path):
    video, masks, labels = own_clip
    frame_dir = prepare(video, masks, tmp_path / "data", size=48, progress=False)
    assert frame_dir == tmp_path / "data" / "JPEGImages" / "480p" / "walk"
    stems = ["00000", "00001", "00002", "00003", "00005", "00006"]
    assert sorted(p.stem for p in frame_dir.glob("*.jpg")) == stems
    mask_dir = tmp_path / "data" / "Annotations" / "480p" / "walk"
    assert sorted(p.stem for p in mask_dir.glob("*.png")) == stems
    image = cv2.imread(str(frame_dir / "00005.jpg"))
    mask = read_mask(mask_dir / "00005.png")
    assert image.shape == (48, 75, 3) and mask.shape == (48, 75)
    assert set(np.unique(mask)) == {0, 1, 2}  # nearest: no blended labels
    expected = cv2.resize(labels[5], (75, 48), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(mask, expected)
    assert not read_mask(mask_dir / "00006.png").any()
    # Nothing is shrunk with --size 0 or when the frames are already small.
    kept = prepare(video, masks, tmp_path / "data", name="walk_full", size=0, progress=False)
    assert cv2.imread(str(kept / "00000.jpg")).shape == (72, 112, 3)
    assert not list((tmp_path / "data" / "JPEGImages" / "480p").glob(".*"))  # no partial folders left
    # Listed for training; --split val moves a sequence to the held-out list.
    sets = tmp_path / "data" / "ImageSets" / "2017"
    assert (sets / "train.txt").read_text().split() == ["walk", "walk_full"]
    prepare(video, masks, tmp_path / "data", name="walk_full", size=0, overwrite=True, split="val", progress=False)
    assert (sets / "train.txt").read_text().split() == ["walk"]
    assert (sets / "val.txt").read_text().split() == ["walk_full"]


def test_prepare_refusals_are_one_sentence(own_clip, tmp_path, capsys):
    video, masks, labels = own_clip
    out = tmp_path / "data"
    prepare(video, masks, out, progress=False)
    with pytest.raises(InputError, match="already holds a sequence named 'walk'"):
        prepare(video, masks, out, progress=False)
    prepare(video, masks, out, overwrite=True, progress=False)  # allowed when asked
    write_mask(masks / "frame_x.png", labels[0])
    with pytest.raises(InputError, match="names no frame of the input"):
        prepare(video, masks, out, name="other", progress=False)
    (masks / "frame_x.png").unlink()
    write_mask(masks / "00004.png", labels[4][:, :100])
    with pytest.raises(InputError, match="00004.png"):
        prepare(video, masks, out, name="other", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_mask(empty / "00000.png", np.zeros((72, 112), np.uint8))
    assert main(["--video", str(video), "--masks", str(empty), "--out", str(out), "--name", "e"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: every mask in") and "\n" not in err
    assert main(["--video", str(tmp_path / "nope.mp4"), "--masks", str(masks), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    one = tmp_path / "one"
    one.mkdir()
    write_mask(one / "00000.png", labels[0])
    assert main(["--video", str(video), "--masks", str(one), "--out", str(out), "--name", "first_only"]) == 0
    assert "train with --stage static" in capsys.readouterr().out  # too few frames for the main stage's clips
    (out / "JPEGImages" / "480p" / "by_hand").mkdir()  # a sequence copied in without a split list
    assert main(["--video", str(video), "--masks", str(one), "--out", str(out), "--name", "third"]) == 0
    assert "by_hand in" in capsys.readouterr().out


def test_finetune_from_a_checkpoint_on_the_prepared_folder(own_clip, tmp_path, capsys):
    import torch

    import corrvos
    from corrvos.training.trainer import Trainer, TrainOptions
    from test_trainer import TINY_STCN

    video, masks, labels = own_clip
    (masks / "00006.png").unlink()  # OCL needs the objects in the first and last frame of a clip
    data = tmp_path / "data"
    prepare(video, masks, data, progress=False)
    prepare(video, masks, data, name="held_out", split="val", progress=False)  # scored, never trained on

    def options(out, **kw):
        return TrainOptions(model=TINY_STCN, data=[str(data)], out=str(out), crop=64, batch=2, iters=2, workers=0,
                            progress=False, log_every=1, save_every=0, seed=5, **kw)

    start = Trainer(options(tmp_path / "start", corr=frozenset())).train()
    assert "one video" not in capsys.readouterr().out  # no correspondence losses: nothing to say
    Trainer(options(tmp_path / "other", load=str(start)))
    assert "pass --negatives intra" in capsys.readouterr().out  # the batch's "other videos" would be this one
    # One video, both correspondence losses with same-video negatives only, BN frozen.
    tuned_trainer = Trainer(options(tmp_path / "tuned", load=str(start), negatives="intra", eval_every=2,
                                    eval_data=str(data), eval_size=0))
    assert "one video" not in capsys.readouterr().out
    assert tuned_trainer.bn_frozen
    assert [seq.name for seq in tuned_trainer.dataset.sequences] == ["walk"]
    tuned = tuned_trainer.train()
    with open(tmp_path / "tuned" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(np.isfinite(float(r["pcl"])) and np.isfinite(float(r["ocl"])) for r in rows)
    assert all(float(r["ocl_n"]) > 0 for r in rows)  # OCL had queries with negatives (intra-video)
    iteration, score = (tmp_path / "tuned" / "eval.csv").read_text().split()[-1].split(",")
    assert iteration == "2" and 0.0 <= float(score) <= 1.0  # J&F of the held-out sequence
    before, after = corrvos.load_model(start).state_dict(), corrvos.load_model(tuned).state_dict()
    assert not torch.equal(before["decoder.pred.weight"], after["decoder.pred.weight"])
    # The tuned model segments the video.
    tracker = corrvos.Tracker(corrvos.load_model(tuned, device="cpu"), device="cpu", size=None)
    frames = [cv2.imread(str(p))[:, :, ::-1].copy() for p in sorted(video.glob("*.png"))]
    out = [lab for _, lab in tracker.propagate(frames, labels[0])]
    assert len(out) == N and all(lab.shape == (72, 112) for lab in out)


def test_training_evaluation_runs_at_the_scale_of_the_crop(own_clip, tmp_path, monkeypatch, capsys):
    # As the saved weights will run (load_model's preferred_size): a 64-pixel crop -> 80p; --eval-size 0 = input size.
    from corrvos.train import build_parser
    from corrvos.training.trainer import Trainer, TrainOptions
    from test_trainer import TINY_STCN

    video, masks, labels = own_clip
    data = tmp_path / "data"
    prepare(video, masks, data, progress=False)
    prepare(video, masks, data, name="held_out", split="val", progress=False)
    seen = []

    def fake_predict(split, net, out, device, size, progress):
        seen.append(size)
        raise RuntimeError("stop after the size")

    monkeypatch.setattr("corrvos.eval.predict.predict_split", fake_predict)
    for eval_size, expected in ((None, 80), (0, None), (48, 48)):
        trainer = Trainer(TrainOptions(model=TINY_STCN, data=[str(data)], out=str(tmp_path / f"run{eval_size}"),
                                       crop=64, batch=2, iters=1, workers=0, progress=False, eval_data=str(data),
                                       eval_size=eval_size))
        assert trainer._evaluate(None, None) is None and seen[-1] == expected
    assert build_parser().parse_args(["--model", "stcn-s", "--data", "d", "--out", "o"]).eval_size is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "stcn-s", "--data", "d", "--out", "o", "--eval-size", "8"])
    assert "--eval-size 8 is too small" in capsys.readouterr().err
