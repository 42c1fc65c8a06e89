"""Shared builders for the app tests: a tiny real DAVIS-2016 clip, its mask and random-weight checkpoints."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SEQ = "blackswan"
SIZE = (160, 96)  # (width, height): 854x480 scaled down; the tracker then runs at the input size


def make_clip(davis_root: Path, out: Path, frames: int = 6, size: tuple[int, int] = SIZE) -> tuple[Path, Path, Path]:
    """First ``frames`` frames of a DAVIS-2016 val clip as a small H.264 mp4, its first-frame mask as a
    palette PNG, and a folder of ground-truth masks (00000.png ...). Returns (video, mask, gt folder)."""
    from corrvos.io.davis import read_annotation
    from corrvos.io.masks import write_mask
    from corrvos.io.video import VideoFrames, VideoWriter

    out.mkdir(parents=True, exist_ok=True)
    video = VideoFrames(davis_root / "videos" / f"{SEQ}.mp4")
    path = out / f"{SEQ}.mp4"
    with VideoWriter(path, fps=24) as writer:
        for t in range(frames):
            writer.write(cv2.resize(video[t], size, interpolation=cv2.INTER_AREA))
    gt = out / "gt"
    gt.mkdir(exist_ok=True)
    for t in range(frames):
        m = read_annotation(davis_root / "Annotations" / "480p" / SEQ / f"{t:05d}.png")
        write_mask(gt / f"{t:05d}.png", cv2.resize(m, size, interpolation=cv2.INTER_NEAREST))
    return path, gt / "00000.png", gt


def make_checkpoints(folder: Path) -> list[Path]:
    """Two stcn-s checkpoints with different random weights, named like the shipped pair."""
    import torch

    import corrvos

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, name in ((0, "stcn-s_baseline.safetensors"), (1, "stcn-s_corr.safetensors")):
        torch.manual_seed(seed)
        corrvos.save_model(corrvos.build_model("stcn-s"), folder / name)
        paths.append(folder / name)
    return paths


def mask_layers(mask: np.ndarray, num_layers: int = 5) -> list[np.ndarray]:
    """Editor layers as the browser sends them: one RGBA array per declared layer, empty ones included."""
    from app.inputs import label_layer

    return [label_layer(mask, k) for k in range(1, num_layers + 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(checkpoints: Path, log: Path, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """``python -m app`` on a free port (CPU, input-size processing); waits until it answers."""
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "app", "--port", str(port), "--checkpoints", str(checkpoints), "--device", "cpu",
           "--size", "0", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited early:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the app did not answer within 120 s:\n{log.read_text()}")


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
