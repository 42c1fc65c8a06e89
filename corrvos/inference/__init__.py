"""Inference: the Tracker and the memory stores it drives (STCN bank, XMem working/long-term memory)."""
from corrvos.inference.tracker import FrameGeometry, FrameRead, Matches, MemoryStats, Tracker

__all__ = ["Tracker", "Matches", "MemoryStats", "FrameGeometry", "FrameRead"]
