"""corrvos: matching-based video object segmentation (STCN, XMem) with correspondence-aware training."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["build_model", "load_model", "save_model", "describe_checkpoint", "Tracker", "VideoSession", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import corrvos` stays cheap for the CLIs' --help and for tools that only need io/eval.
    if name in ("build_model", "load_model", "save_model"):
        from corrvos.models import checkpoint

        return getattr(checkpoint, name)
    if name == "describe_checkpoint":
        from corrvos.models.provenance import describe_checkpoint

        return describe_checkpoint
    if name == "Tracker":
        from corrvos.inference.tracker import Tracker

        return Tracker
    if name == "VideoSession":
        from corrvos.inference.video_session import VideoSession

        return VideoSession
    raise AttributeError(f"module 'corrvos' has no attribute {name!r}")
