"""Ground-truth uploads in the app: zips and loose PNGs matched to frames, and no temp files left behind."""
import tempfile
import zipfile

import numpy as np
import pytest

from app.inputs import read_ground_truth
from corrvos.errors import InputError
from corrvos.io.masks import write_mask

SHAPE = (12, 16, 3)
NAMES = ["00000", "00001", "00002"]


def _masks(tmp_path, names=NAMES, shape=SHAPE):
    paths = []
    for i, n in enumerate(names):
        lab = np.zeros(shape[:2], np.uint8)
        lab[i : i + 3, 2:6] = 1
        paths.append(write_mask(tmp_path / f"{n}.png", lab))
    return paths


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Route tempfile into a folder of our own, so leftovers can be counted."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_zip_of_masks_matches_frames_by_name_and_leaves_no_temp_folder(tmp_path, private_tmp):
    pngs = _masks(tmp_path)
    archive = tmp_path / "gt.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in reversed(pngs[1:]):  # frame 0 not annotated, members out of order
            zf.write(p, f"Annotations/{p.name}")
        zf.writestr("__MACOSX/._00001.png", b"junk")
    gt = read_ground_truth(str(archive), NAMES, SHAPE)
    assert gt[0] is None
    for t in (1, 2):
        assert gt[t][t, 2] == 1 and gt[t].sum() == 12
    assert list(private_tmp.iterdir()) == []


def test_masks_match_by_order_when_names_differ(tmp_path):
    pngs = _masks(tmp_path, names=["a", "b", "c"])
    gt = read_ground_truth([str(p) for p in pngs], NAMES, SHAPE)
    assert [int(np.argmax(g[:, 2])) for g in gt] == [0, 1, 2]


def test_bad_ground_truth_uploads_are_one_sentence(tmp_path, private_tmp):
    bad = tmp_path / "gt.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable zip"):
        read_ground_truth([str(bad)], NAMES, SHAPE)
    with pytest.raises(InputError, match="holds no PNG masks"):
        read_ground_truth([str(tmp_path / "notes.txt")], NAMES, SHAPE)
    small = _masks(tmp_path, names=["00000"], shape=(6, 8))
    with pytest.raises(InputError, match="6x8 but the frames are 12x16"):
        read_ground_truth([str(p) for p in small], NAMES, SHAPE)
    few = _masks(tmp_path, names=["x", "y"])
    with pytest.raises(InputError, match="count differs"):
        read_ground_truth([str(p) for p in few], NAMES, SHAPE)
    assert list(private_tmp.iterdir()) == []


def test_session_store_removes_its_own_temp_root_but_not_a_given_one(tmp_path, private_tmp):
    import gc

    from app.session import SessionStore

    store = SessionStore(2)
    root = store.work_root
    store.new_workdir("abc")
    assert (root / "abc").is_dir() and root.parent == private_tmp
    del store
    gc.collect()
    assert not root.exists()
    given = tmp_path / "work"
    store = SessionStore(2, given)
    store.new_workdir("abc")
    del store
    gc.collect()
    assert (given / "abc").is_dir()
