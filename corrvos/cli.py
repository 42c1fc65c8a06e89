"""``corrvos``: one command for everything corrvos does (``corrvos <command> --help`` for each one's options).

Each subcommand is the ``main`` of a module that also runs as ``python -m <module>``; this front end adds the
shared exit behaviour: a :class:`~corrvos.errors.CorrvosError` that reaches it is printed as its one sentence
(exit status 2), Ctrl+C exits with 130, never a traceback.
"""
from __future__ import annotations

import importlib
import sys

from corrvos.errors import CorrvosError

# command -> (module with main(argv), what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "infer": ("corrvos.infer", "segment a video from a first-frame mask (or masks at several frames)"),
    "matches": ("corrvos.matches", "where one pixel's memory read goes, per checkpoint, as figures"),
    "eval": ("corrvos.eval.__main__", "DAVIS evaluation of a results folder or a checkpoint"),
    "youtube": ("corrvos.eval.youtube", "YouTube-VOS masks and a CodaLab submission"),
    "compare": ("corrvos.eval.compare", "paired per-object comparison of evaluation runs"),
    "bench": ("corrvos.bench", "amortised FPS, per-stage times and memory"),
    "train": ("corrvos.train", "train a model (single process or under torchrun)"),
    "prepare": ("corrvos.training.prepare", "turn a video and checked masks into a training sequence"),
    "proposals": ("corrvos.training.proposals", "Selective Search proposals for the object-level loss"),
    "weights": ("corrvos.weights", "list and fetch the official checkpoints"),
    "app": ("app.__main__", "start the Gradio app on 127.0.0.1"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: corrvos <command> [options]   (corrvos <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "--version":
        from corrvos import __version__

        print(__version__)
        return 0
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        status = module.main(rest)
    except CorrvosError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
