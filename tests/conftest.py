import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"
DAVIS2016 = SHARED / "data" / "davis2016"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def davis2016_root() -> Path:
    """The shared compact DAVIS-2016 copy (videos + masks); skips when the folder is absent."""
    if not (DAVIS2016 / "videos").is_dir():
        pytest.skip(f"DAVIS-2016 data not found at {DAVIS2016} (../shared/data is absent)")
    return DAVIS2016


@pytest.fixture(autouse=True)
def _small_threads():
    # Test tensors are tiny: waking a second intra-op thread per op costs more than the op, and on a
    # loaded 2-core machine it made tiny forward passes 10-100x slower. One thread is faster and steadier.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
