"""The Tracker's memory, precision and size settings as command-line options, shared by infer, eval, bench and the app.

No torch at import time: the command lines check their arguments before loading it.

Names follow XMem's and STCN's evaluation scripts where they exist (``--mem-every``, ``--top-k``,
``--max-memory-frames`` for STCN; ``--min-working-frames`` / ``--max-working-frames`` are upstream's
``--min_mid_term_frames`` / ``--max_mid_term_frames``, ``--no-long-term`` its ``--disable_long_term``,
``--deep-update-every`` its ``--deep_update_every``).
Options for the other architecture are refused once the model is known, so a flag is never silently ignored.
"""
from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass

from corrvos.errors import InputError
from corrvos.precision import PRECISIONS


@dataclass(frozen=True)
class _Option:
    flag: str
    help: str
    arch: str | None = None  # None: both architectures
    minimum: int = 1


# Integer options; their defaults are the Tracker's (None here means "not given": the Tracker's default applies).
_INT_OPTIONS = (
    _Option("--mem-every", "add a frame to the memory every N frames (default: 5)"),
    _Option("--top-k", "memory positions kept per query pixel in the softmax (default: 20 STCN, 30 XMem)"),
    _Option("--max-memory-frames",
            "STCN: cap the memory bank for long videos, dropping the oldest frames without a given mask "
            "(default: unbounded, as upstream)", arch="stcn", minimum=2),
    _Option("--min-working-frames",
            "XMem: working-memory frames kept after a consolidation (upstream min_mid_term_frames; default: 5)",
            arch="xmem"),
    _Option("--max-working-frames",
            "XMem: working-memory frames that trigger a consolidation into long-term memory "
            "(upstream max_mid_term_frames; default: 10)", arch="xmem", minimum=2),
    _Option("--num-prototypes", "XMem: prototypes kept per consolidation (default: 128)", arch="xmem"),
    _Option("--deep-update-every",
            "XMem: deep-update the sensory memory at most every N frames, on memory frames, the decoder updating it "
            "on every frame (upstream --deep_update_every; default: with every memory frame)", arch="xmem"),
    _Option("--max-long-term-elements", "XMem: long-term memory cap in elements (default: 10000)",
            arch="xmem", minimum=2),
)
_ARCH_NAMES = {"stcn": "STCN", "xmem": "XMem"}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


# Tracker keyword -> (its flag, the architecture it configures; None: both).
_KEYWORDS = {_dest(o.flag): (o.flag, o.arch) for o in _INT_OPTIONS} | {"enable_long_term": ("--no-long-term", "xmem")}


def add_tracker_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the memory and precision options (one argument group) to ``parser``."""
    group = parser.add_argument_group("memory and precision")
    for opt in _INT_OPTIONS:
        group.add_argument(opt.flag, type=int, default=None, metavar="N", help=opt.help)
    group.add_argument("--no-long-term", action="store_true",
                       help="XMem: no long-term memory (working memory grows without bound; upstream --disable_long_term)")
    group.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="fp32, or bf16/fp16: the network under autocast, the memory kept in fp32 (default: fp32)")


MIN_SIZE = 16  # one stride-16 feature cell: anything smaller has no key map at all


def size_type(flag: str = "--size"):
    """argparse type of a size flag: a shorter side in pixels, or 0 for the input size (-1 is accepted as 0)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a whole number of pixels, not {text!r}") from None
        if value in (0, -1):
            return 0
        if value < MIN_SIZE:
            raise argparse.ArgumentTypeError(
                f"{flag} {value} is too small; use a shorter side of at least {MIN_SIZE} pixels, or 0 for the input size"
            )
        return value

    return parse


def add_size_argument(parser: argparse.ArgumentParser, default_help: str = "the checkpoint's training scale, "
                      "480 for upstream files") -> None:
    """Add ``--size`` (the Tracker's processing size), the same for every command: masks always come back at the
    input size; 0 (or -1, the older spelling of infer and matches) keeps the input size."""
    parser.add_argument("--size", type=size_type("--size"), default=None, metavar="PIXELS",
                        help=f"shorter side the tracker resizes frames to; 0 keeps the input size (default: {default_help}). "
                             "Masks are always written at the input size")


def processing_size(size: int | None, preferred: int | None) -> int | None:
    """The Tracker's ``size`` for a parsed ``--size``: the model's ``preferred`` size when not given, None (the input
    size) for 0."""
    if size is None:
        return preferred
    return size or None


def given_tracker_options(args: argparse.Namespace) -> list[str]:
    """The flags of this group that were set away from their defaults (e.g. for refusing ``eval --record``)."""
    given = [opt.flag for opt in _INT_OPTIONS if getattr(args, _dest(opt.flag)) is not None]
    if args.no_long_term:
        given.append("--no-long-term")
    if args.precision != "fp32":
        given.append("--precision")
    return given


def tracker_options(args: argparse.Namespace, arch: str | None = None) -> dict:
    """Validated ``Tracker`` keyword arguments from the parsed options; raises InputError (one sentence).

    With ``arch`` ("stcn" or "xmem", the loaded model's), options of the other architecture are refused.
    """
    options: dict = {}
    for opt in _INT_OPTIONS:
        value = getattr(args, _dest(opt.flag))
        if value is None:
            continue
        if value < opt.minimum:
            raise InputError(f"{opt.flag} must be at least {opt.minimum}, not {value}.")
        options[_dest(opt.flag)] = value
    if args.no_long_term:
        options["enable_long_term"] = False
    if arch is not None:
        for key in options:
            flag, other = _KEYWORDS[key]
            if other not in (None, arch):
                raise InputError(
                    f"{flag} configures {_ARCH_NAMES[other]}'s memory, but this is an {_ARCH_NAMES[arch]} model; drop it."
                )
    from corrvos.inference.tracker import Tracker

    defaults = {name: p.default for name, p in inspect.signature(Tracker.__init__).parameters.items()}
    low, high, prototypes, cap = (
        options.get(name, defaults[name])
        for name in ("min_working_frames", "max_working_frames", "num_prototypes", "max_long_term_elements")
    )
    if not args.no_long_term and low >= high:
        raise InputError(f"--min-working-frames ({low}) must be smaller than --max-working-frames ({high}).")
    if not args.no_long_term and prototypes >= cap:
        raise InputError(f"--num-prototypes ({prototypes}) must be smaller than --max-long-term-elements ({cap}).")
    if args.precision != "fp32":  # fp32 is the Tracker's default: left out like every option not given
        options["precision"] = args.precision
    return options


def run_device(args: argparse.Namespace) -> str:
    """The device a command runs its models on: ``--device``, else cuda when available. Raises InputError for a GPU
    that is not there and for a ``--precision`` the device cannot run (before any model is loaded)."""
    import torch

    from corrvos.precision import check_precision

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device} was asked for but no CUDA GPU is available here; use --device cpu.")
    check_precision(args.precision, device)
    return device


def for_architecture(options: dict, arch: str) -> dict:
    """``options`` without the other architecture's keys: for a program that runs STCN and XMem models side by side."""
    return {k: v for k, v in options.items() if _KEYWORDS.get(k, (None, None))[1] in (None, arch)}
