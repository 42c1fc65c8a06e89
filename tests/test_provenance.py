"""A checkpoint's training record and recorded scores: written atomically, tensors untouched, shown in one line."""
import json

import pytest
import torch
from safetensors import safe_open

from corrvos.errors import CheckpointError
from corrvos.eval.__main__ import main as eval_main
from corrvos.models.checkpoint import build_model, checkpoint_metadata, save_model
from corrvos.models.provenance import SCORES_KEY, describe_checkpoint, record_scores, recorded_scores

TRAIN_RECORD = {
    "stage": "main", "iterations": 3500, "stage_iters": 3500, "corr": "ocl,pcl",
    "train_options": {"batch": 4, "crop": 160, "imagenet": False, "device": "cpu", "load": "static/final.safetensors"},
}


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_recorded_scores_keep_the_tensors_and_the_training_record(tmp_path):
    path = save_model(build_model("stcn-s"), tmp_path / "m.safetensors", dtype=torch.float16,
                      extra_metadata=TRAIN_RECORD)
    before = _tensors(path)
    record_scores(path, "DAVIS-2016 val", {"J&F": 0.5, "J": 0.55, "F": 0.45, "size": 192})
    record_scores(path, "DAVIS-2017 val", {"J&F": 0.3, "J": 0.3, "F": 0.3, "size": 192})
    after = _tensors(path)
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    meta = checkpoint_metadata(path)
    assert meta["iterations"] == "3500" and json.loads(meta["train_options"])["crop"] == 160
    assert set(recorded_scores(meta)) == {"DAVIS-2016 val", "DAVIS-2017 val"}
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file of the atomic write was left behind"

    line = describe_checkpoint(path)
    assert line.startswith("stcn-s · L_seg + PCL + OCL · main stage 3500/3500 its after static pretraining")
    assert "from scratch, on cpu, runs at 192p" in line
    assert "DAVIS-2016 val: J&F 0.500 (J 0.550, F 0.450) at 192p" in line


def test_description_of_a_baseline_an_upstream_file_and_a_missing_file(tmp_path):
    base = save_model(build_model("stcn-s"), tmp_path / "b.safetensors", extra_metadata={**TRAIN_RECORD, "corr": ""})
    assert " · L_seg · " in describe_checkpoint(base)
    upstream = tmp_path / "stcn.pth"
    torch.save(build_model("stcn-s").state_dict(), upstream)
    assert describe_checkpoint(upstream) == "upstream release file (no training record)"
    assert describe_checkpoint(tmp_path / "gone.safetensors").startswith("unreadable: ")
    assert recorded_scores({SCORES_KEY: "not json"}) == {}


def test_scores_are_only_recorded_in_corrvos_safetensors(tmp_path):
    upstream = tmp_path / "stcn.pth"
    torch.save({"x": torch.zeros(1)}, upstream)
    with pytest.raises(CheckpointError, match="only be recorded in corrvos .safetensors"):
        record_scores(upstream, "DAVIS-2016 val", {})
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a corrvos checkpoint"):
        record_scores(foreign, "DAVIS-2016 val", {})


def test_eval_record_refuses_a_subset_before_running(tmp_path, capsys):
    davis = tmp_path / "davis"
    (davis / "ImageSets" / "2016").mkdir(parents=True)
    (davis / "ImageSets" / "2016" / "val.txt").write_text("a\n")
    code = eval_main(["--davis", str(davis), "--checkpoint", str(tmp_path / "m.safetensors"), "--sequences", "a",
                      "--record"])
    assert code == 2 and "--record needs --checkpoint and the whole split" in capsys.readouterr().err
