"""``python -m app``: start the corrvos app on http://127.0.0.1:7860."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from app.session import AppConfig, default_device
from corrvos.errors import InputError
from corrvos.precision import check_precision
from corrvos.tracker_options import add_size_argument, add_tracker_arguments, tracker_options


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m app", description="Compare two VOS checkpoints and inspect their memory matching.")
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    ap.add_argument("--checkpoints", type=Path, default=None,
                    help="checkpoint folder (default: $CORRVOS_CHECKPOINTS or ./checkpoints)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    add_size_argument(ap, "each checkpoint's training scale, 192 for the shipped models (trained on 160-pixel crops), "
                          "480 for upstream ones")
    ap.add_argument("--max-frames", type=int, default=None, help="frame cap (default 100 on CPU, 1500 on GPU)")
    ap.add_argument("--max-file-size", default="500mb", help="upload size limit (default 500mb)")
    add_tracker_arguments(ap)  # for both models; each gets the options of its architecture
    args = ap.parse_args(argv)
    try:
        options = tracker_options(args)
        check_precision(args.precision, args.device or default_device())
    except InputError as err:
        ap.exit(2, f"error: {err}\n")

    kwargs = {}
    if args.checkpoints is not None:
        kwargs["checkpoints"] = args.checkpoints
    config = AppConfig(device=args.device or default_device(), size=args.size, max_frames=args.max_frames,
                       tracker_options=options, **kwargs)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.ui import build_demo

    demo = build_demo(config)
    # Service managers stop the app with SIGTERM: exit like Ctrl+C does, so that the session store removes
    # its temp folder (every upload's overlays and exports) instead of leaving it in /tmp.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=args.max_file_size)


if __name__ == "__main__":
    main()
