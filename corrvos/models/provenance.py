"""What a checkpoint is: its model, how it was trained and how it scored, from its safetensors metadata.

Training writes ``stage``, ``iterations``, ``corr`` and ``train_options`` into every file it saves;
``python -m corrvos.eval --checkpoint C --record`` adds the benchmark scores under ``SCORES_KEY``. So the app
and ``describe_checkpoint`` can tell a user what a file is without a separate model card to keep in sync.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from corrvos.errors import CheckpointError
from corrvos.models.checkpoint import CONFIG_KEY, PathLike, checkpoint_metadata, preferred_size, write_safetensors

SCORES_KEY = "corrvos_scores"
LOSS_NAMES = {"pcl": "PCL", "ocl": "OCL"}


def recorded_scores(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``{benchmark: scores}`` recorded in a checkpoint's metadata ({} when none or unreadable)."""
    try:
        scores = json.loads(metadata.get(SCORES_KEY, "{}"))
    except json.JSONDecodeError:
        return {}
    return scores if isinstance(scores, dict) else {}


def record_scores(path: PathLike, benchmark: str, scores: dict[str, Any]) -> None:
    """Store ``scores`` under ``benchmark`` in a corrvos safetensors file, atomically; tensors are unchanged."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"scores can only be recorded in corrvos .safetensors files, not in {path.name}.")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path.name} could not be read to record its scores ({err}).") from err
    if CONFIG_KEY not in metadata:
        raise CheckpointError(f"{path.name} is not a corrvos checkpoint (no model configuration); scores not recorded.")
    all_scores = recorded_scores(metadata)
    all_scores[benchmark] = scores
    metadata[SCORES_KEY] = json.dumps(all_scores, sort_keys=True)
    write_safetensors(tensors, path, metadata)


def describe_checkpoint(path: PathLike) -> str:
    """One line for people: model, losses, training run, recorded scores (or why the file cannot be read)."""
    path = Path(path)
    try:
        metadata = checkpoint_metadata(path)
    except CheckpointError as err:
        return f"unreadable: {err}"
    if CONFIG_KEY not in metadata:
        return "upstream release file (no training record)"
    parts = [json.loads(metadata[CONFIG_KEY]).get("name", "custom model")]
    if "corr" in metadata:
        used = {c for c in metadata["corr"].split(",") if c and c != "none"}
        losses = [name for key, name in LOSS_NAMES.items() if key in used] + sorted(used - LOSS_NAMES.keys())
        parts.append(" + ".join(["L_seg", *losses]))
    parts.append(_training_line(metadata))
    for benchmark, s in sorted(recorded_scores(metadata).items()):
        try:
            parts.append(f"{benchmark}: J&F {s['J&F']:.3f} (J {s['J']:.3f}, F {s['F']:.3f}) at {s['size']}{'p' if isinstance(s['size'], int) else ' size'}")
        except (KeyError, TypeError, ValueError):
            continue
    return " · ".join(p for p in parts if p)


def _training_line(metadata: dict[str, str]) -> str:
    try:
        opts = json.loads(metadata.get("train_options", "{}"))
    except json.JSONDecodeError:
        opts = {}
    if not isinstance(opts, dict) or "iterations" not in metadata:
        return ""
    stage = metadata.get("stage", "")
    line = f"{stage} stage {metadata['iterations']}/{metadata.get('stage_iters', '?')} its"
    if stage == "main" and opts.get("load"):
        line += " after static pretraining"
    line += f", batch {opts.get('batch', '?')}, crop {opts.get('crop', '?')}"
    line += ", ImageNet init" if opts.get("imagenet") else ", from scratch"
    if opts.get("device"):
        line += f", on {opts['device']}"
    return line + f", runs at {preferred_size(metadata)}p"
