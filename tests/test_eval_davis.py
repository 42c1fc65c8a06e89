"""DAVIS evaluation of folders: synthetic DAVIS-2017 sequences computed by hand, errors, CSVs, real DAVIS-2016."""

import cv2
import numpy as np
import pytest
from PIL import Image

from corrvos.errors import DatasetError, InputError
from corrvos.eval.__main__ import main
from corrvos.eval.davis_eval import evaluate_results, evaluate_sequence, open_davis, write_csvs
from corrvos.io.masks import write_mask

H = W = 20


def square(r0, c0, size=4):
    m = np.zeros((H, W), np.uint8)
    m[r0:r0 + size, c0:c0 + size] = 1
    return m


def make_davis2017(root, gt_frames: dict, pred_frames: dict):
    """Write Annotations/480p/<seq>/%05d.png (+ ImageSets/2017/val.txt) and results/<seq>/%05d.png."""
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(gt_frames) + "\n")
    for seq, frames in gt_frames.items():
        d = root / "Annotations" / "480p" / seq
        d.mkdir(parents=True)
        for t, labels in enumerate(frames):
            write_mask(d / f"{t:05d}.png", labels)
    res = root / "results"
    for seq, frames in pred_frames.items():
        d = res / seq
        d.mkdir(parents=True)
        for t, labels in frames.items():
            write_mask(d / f"{t:05d}.png", labels)
    return res


@pytest.fixture
def two_object_davis(tmp_path):
    # Sequence "a", 5 frames: object 1 = square at (2,2) in every frame; object 2 = square at (10,10) in
    # frames 0..2 and gone in 3..4. Scored frames are 1..3.
    # Prediction: object 1 exact, object 2 never predicted (missing object -> zero-filled).
    gt = []
    for t in range(5):
        labels = square(2, 2)
        if t <= 2:
            labels = labels + 2 * square(10, 10)
        gt.append(labels.astype(np.uint8))
    pred = {t: square(2, 2) for t in range(1, 4)}
    res = make_davis2017(tmp_path, {"a": gt}, {"a": pred})
    return tmp_path, res


def test_missing_object_zero_filled_by_hand(two_object_davis):
    root, res = two_object_davis
    split = open_davis(root, "val")
    assert split.year == "2017" and split.sequences == ["a"]
    result = evaluate_results(split, res, progress=False)
    o1, o2 = result.objects
    assert o1.frame_ids == ["00001", "00002", "00003"]  # first and last frames excluded
    assert o1.j.tolist() == [1.0, 1.0, 1.0] and o1.f.tolist() == [1.0, 1.0, 1.0]
    # Object 2: frames 1, 2 GT present, prediction empty -> J = 0, F = 0 (P=1, R=0); frame 3 both empty -> 1.
    assert o2.j.tolist() == [0.0, 0.0, 1.0] and o2.f.tolist() == [0.0, 0.0, 1.0]
    # Stats of object 2: mean 1/3, recall 1/3; n = 3 -> bins [0,1,1,2,2]: first v[0:2] = 0, last v[2:3] = 1.
    assert o2.j_stats == pytest.approx((1 / 3, 1 / 3, -1.0))
    g = result.global_scores()
    # Object-weighted: J-Mean = (1 + 1/3)/2 = 2/3, same for F; decay (0 + -1)/2 = -0.5.
    assert g["J-Mean"] == pytest.approx(2 / 3) and g["F-Mean"] == pytest.approx(2 / 3)
    assert g["J&F-Mean"] == pytest.approx(2 / 3) and g["J-Recall"] == pytest.approx(2 / 3)
    assert g["J-Decay"] == pytest.approx(-0.5) and g["F-Decay"] == pytest.approx(-0.5)


def test_csv_format(two_object_davis):
    root, res = two_object_davis
    result = evaluate_results(open_davis(root, "val"), res, progress=False)
    global_csv, seq_csv = write_csvs(result, res)
    assert global_csv.read_text() == (
        "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay\n"
        "0.667,0.667,0.667,-0.500,0.667,0.667,-0.500\n"
    )
    assert seq_csv.read_text() == "Sequence,J-Mean,F-Mean\na_1,1.000,1.000\na_2,0.333,0.333\n"


def test_void_pixels_are_background_and_count_as_false_positives(tmp_path):
    # GT object 1 = 16 px square; frame 1 also has 4 void pixels (255) that the prediction covers:
    # void becomes background, so J = 16 / (16 + 4) = 0.8 on frame 1 and 1 elsewhere.
    gt = [square(2, 2) for _ in range(4)]
    gt[1] = gt[1].copy()
    gt[1][15, 0:4] = 255
    pred = {t: square(2, 2) for t in (1, 2)}
    pred[1] = pred[1].copy()
    pred[1][15, 0:4] = 1
    res = make_davis2017(tmp_path, {"v": gt}, {"v": pred})
    (obj,) = evaluate_sequence(open_davis(tmp_path, "val"), "v", res)
    assert obj.j.tolist() == [0.8, 1.0]


def test_extra_object_is_an_error(tmp_path):
    gt = [square(2, 2) for _ in range(3)]
    res = make_davis2017(tmp_path, {"x": gt}, {"x": {1: square(2, 2) + 2 * square(10, 10)}})
    with pytest.raises(InputError, match="has label 2 but sequence 'x' has only 1 object"):
        evaluate_results(open_davis(tmp_path, "val"), res, progress=False)


def test_missing_and_missized_predictions(tmp_path):
    gt = [square(2, 2) for _ in range(4)]
    res = make_davis2017(tmp_path, {"m": gt}, {"m": {1: square(2, 2)}})
    split = open_davis(tmp_path, "val")
    with pytest.raises(InputError, match=r"00002\.png is missing"):
        evaluate_sequence(split, "m", res)
    write_mask(res / "m" / "00002.png", np.zeros((10, 20), np.uint8))
    with pytest.raises(InputError, match="is 10x20 .* but the annotation is 20x20"):
        evaluate_sequence(split, "m", res)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(res / "m" / "00002.png")
    with pytest.raises(InputError, match="colour image"):
        evaluate_sequence(split, "m", res)


def test_missing_sequence_errors(tmp_path):
    gt = [square(2, 2) for _ in range(3)]
    res = make_davis2017(tmp_path, {"s": gt}, {})
    res.mkdir()
    with pytest.raises(DatasetError, match="'nope' is not in the DAVIS-2017 val split"):
        open_davis(tmp_path, "val", sequences=["nope"])
    with pytest.raises(InputError, match="no predictions for sequence 's'"):
        evaluate_results(open_davis(tmp_path, "val"), res, progress=False)
    with pytest.raises(DatasetError, match="no sequence list for the 'test' split"):
        open_davis(tmp_path, "test")


def _copy_gt(davis2016_root, out, seqs, erode=0):
    for seq in seqs:
        (out / seq).mkdir(parents=True)
        for p in sorted((davis2016_root / "Annotations" / "480p" / seq).glob("*.png")):
            m = (np.array(Image.open(p)) > 127).astype(np.uint8)
            if erode:
                m = cv2.erode(m, np.ones((erode, erode), np.uint8))
            write_mask(out / seq / p.name, m)


def test_davis2016_gt_as_prediction_and_eroded(davis2016_root, tmp_path, capsys):
    seqs = ["blackswan", "bmx-trees"]
    exact, eroded = tmp_path / "exact", tmp_path / "eroded"
    _copy_gt(davis2016_root, exact, seqs)
    _copy_gt(davis2016_root, eroded, seqs, erode=7)
    rc = main(["--davis", str(davis2016_root), "--results", str(exact), "--sequences", ",".join(seqs),
               "--workers", "1", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Global results for val" in out and "blackswan_1" in out and "Evaluation took" in out
    assert (exact / "global_results.csv").read_text().splitlines()[1] == "1.000,1.000,1.000,0.000,1.000,1.000,0.000"
    split = open_davis(davis2016_root, "val", sequences=seqs)
    assert split.year == "2016"
    result = evaluate_results(split, eroded, progress=False)
    g = result.global_scores()
    assert [o.name for o in result.objects] == ["blackswan_1", "bmx-trees_1"]
    assert 0.3 < g["J-Mean"] < 1.0 and g["F-Mean"] < 1.0
    # 0/255 grayscale predictions (the DAVIS-2016 file format itself) are accepted as one object.
    result_raw = evaluate_results(
        open_davis(davis2016_root, "val", sequences=["blackswan"]), davis2016_root / "Annotations" / "480p",
        progress=False,
    )
    assert result_raw.global_scores()["J&F-Mean"] == 1.0


def test_cli_reports_one_sentence_errors(tmp_path, capsys):
    rc = main(["--davis", str(tmp_path / "missing"), "--results", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the DAVIS folder") and err.count("\n") == 0


def test_predict_only_writes_every_frame_and_scores_nothing(davis2016_root, tmp_path, capsys):
    # DAVIS-2017 test-dev has the first annotation only: --predict-only must not need the others.
    import corrvos

    ckpt = tmp_path / "stcn-s.safetensors"
    corrvos.save_model(corrvos.build_model("stcn-s"), ckpt)
    out = tmp_path / "masks"
    rc = main(["--davis", str(davis2016_root), "--split", "val", "--sequences", "blackswan", "--checkpoint", str(ckpt),
               "--out", str(out), "--device", "cpu", "--size", "64", "--predict-only", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "not scored (--predict-only)" in printed and "J&F" not in printed
    assert len(list((out / "blackswan").glob("*.png"))) == 50
    assert not (out / "global_results.csv").exists()
    assert main(["--davis", str(davis2016_root), "--results", str(out), "--predict-only"]) == 2
    assert "--predict-only runs --checkpoint" in capsys.readouterr().err
