"""The checkpoints in checkpoints/ are the ones checkpoints/README.md documents: same bytes (sha256), loadable,
fp16 and small, with their training record and recorded DAVIS-2016 scores, and they segment a clip."""
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from corrvos import Tracker, load_model
from corrvos.models.checkpoint import checkpoint_metadata
from corrvos.models.provenance import recorded_scores

FOLDER = Path(__file__).resolve().parents[1] / "checkpoints"
CARD = FOLDER / "README.md"
# "| `name.safetensors` | ... | <64 hex digits> |" rows of the card's file table.
ROW = re.compile(r"^\|\s*`([^`]+\.safetensors)`.*\b([0-9a-f]{64})\b", re.MULTILINE)


def _documented() -> list[tuple[str, str]]:
    if not CARD.is_file():
        return []
    return ROW.findall(CARD.read_text())


DOCUMENTED = _documented()
pytestmark = pytest.mark.skipif(not DOCUMENTED, reason="no shipped checkpoints documented in checkpoints/README.md")


def test_every_file_in_the_folder_is_documented():
    on_disk = sorted(p.name for p in FOLDER.glob("*.safetensors"))
    assert on_disk == sorted(name for name, _ in DOCUMENTED)


@pytest.mark.parametrize("name,sha", DOCUMENTED)
def test_documented_checkpoint_is_the_shipped_one(name, sha):
    path = FOLDER / name
    data = path.read_bytes()
    assert not data.startswith(b"version https://git-lfs"), f"{name} is a Git LFS pointer, not the weights"
    assert hashlib.sha256(data).hexdigest() == sha, f"{name} differs from the file checkpoints/README.md documents"
    assert len(data) <= 16 * 2**20
    meta = checkpoint_metadata(path)
    # A pair may be shipped at a common snapshot before the end of its stage (checkpoints/README.md says why).
    assert meta["stage"] == "main" and 0 < int(meta["iterations"]) <= int(meta["stage_iters"])
    assert ("corr" in name) == bool(meta["corr"]), "a _corr file must be trained with the correspondence losses"
    scores = recorded_scores(meta)["DAVIS-2016 val"]
    assert 0.0 <= scores["J&F"] <= 1.0 and f"{scores['J&F']:.3f}" in CARD.read_text()

    model = load_model(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp16 on disk, fp32 in memory
    torch.manual_seed(0)
    frames = [np.asarray(torch.randint(0, 255, (96, 128, 3), dtype=torch.uint8)) for _ in range(3)]
    mask = np.zeros((96, 128), np.uint8)
    mask[30:70, 40:90] = 1
    out = [labels for _, labels in Tracker(model, size=96).propagate(frames, mask)]
    assert len(out) == 3 and out[0].shape == (96, 128)


def test_pairs_share_their_training_budget():
    by_name = {name: checkpoint_metadata(FOLDER / name) for name, _ in DOCUMENTED}
    for name, meta in by_name.items():
        twin = name.replace("_baseline", "_corr")
        if twin == name or twin not in by_name:
            continue
        assert meta["iterations"] == by_name[twin]["iterations"], f"{name} and {twin} stop at different iterations"
        a, b = json.loads(meta["train_options"]), json.loads(by_name[twin]["train_options"])
        for key in ("iters", "batch", "crop", "lr", "seed", "model", "bn", "bootstrap_p", "grad_clip", "sequences"):
            assert a.get(key) == b.get(key), f"{name} and {twin} differ in {key}"
