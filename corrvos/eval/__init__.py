"""DAVIS evaluation (J&F identical to the official tool) and correspondence-quality metrics.

``python -m corrvos.eval --help`` for the command line. Torch-based parts (model runs, correspondence
metrics) live in their own modules so that scoring a results folder needs only numpy, OpenCV and PIL.
"""
from corrvos.eval.davis_eval import (
    DavisSplit,
    EvalResult,
    ObjectResult,
    evaluate_results,
    evaluate_sequence,
    format_tables,
    open_davis,
    write_csvs,
)
from corrvos.eval.metrics import boundary_f, jaccard, object_statistics, seg2bmap

__all__ = [
    "DavisSplit", "EvalResult", "ObjectResult", "evaluate_results", "evaluate_sequence", "format_tables",
    "open_davis", "write_csvs", "boundary_f", "jaccard", "object_statistics", "seg2bmap",
]
