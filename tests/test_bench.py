"""``python -m corrvos.bench`` on tiny CPU runs: JSON contents, stage accounting, long-run checkpoints, errors."""
from __future__ import annotations

import json

import pytest
import torch

from corrvos import bench
from corrvos.benchmarking.clip import synthetic_clip, synthetic_size
from corrvos.benchmarking.stages import STAGES, StageTimer
from corrvos.inference.tracker import Tracker
from fake_vos_net import FakeVOSNet

TINY = ["--resolution", "64", "--objects", "2", "--warmup", "1", "--threads", "2", "--device", "cpu"]


def _run(tmp_path, *argv: str) -> dict:
    out = tmp_path / "bench.json"
    assert bench.main([*argv, *TINY, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("model", ["stcn-s", "xmem-s"])
def test_bench_json_with_stages(tmp_path, model):
    r = _run(tmp_path, "--model", model, "--frames", "6", "--stages")
    assert r["model"] == model and r["objects"] == 2 and r["frames"] == 6
    assert r["frame_size"] == [64, 128]
    assert r["fps"] > 0 and r["seconds"] > 0
    assert r["fps"] == pytest.approx(6 / r["seconds"], rel=1e-2)
    assert r["env"]["threads"] == 2 and r["env"]["device"] == "cpu" and r["env"]["torch"] == torch.__version__
    assert r["memory"]["rss_peak_mb"] > 0

    stages = r["stages"]
    assert stages["pass"] == "timed"  # on the CPU the timed pass itself is instrumented
    ms = stages["ms_per_frame"]
    assert set(ms) == {*STAGES, "other"}
    total_ms = 1000 * r["seconds"] / r["frames"]
    measured = sum(v for k, v in ms.items() if k != "other")
    assert all(ms[k] > 0 for k in ("key_encoding", "memory_read", "decoding", "value_encoding"))
    assert measured <= total_ms + 0.5  # rounding of the JSON numbers
    assert ms["other"] >= -0.5
    assert measured + ms["other"] == pytest.approx(total_ms, abs=0.5)
    # Frame 0 has a mask (no read); frame 5 is a memory frame (t % 5 == 0 / 5 frames since the last) but
    # the last one, so it is not memorised: value encoding ran only on frame 0.
    assert stages["calls"] == {"key_encoding": 6, "memory_read": 5, "decoding": 5, "value_encoding": 1,
                               "memory_write": 1}


def test_bench_long_run_records_checkpoints(tmp_path, capsys):
    r = _run(tmp_path, "--model", "stcn-s", "--long", "8", "--long-points", "4", "--mem-every", "1",
             "--max-memory-frames", "3")
    assert r["frames"] == 8 and r["long"]["frames"] == 8
    points = r["long"]["checkpoints"]
    assert [c["frame"] for c in points] == [2, 4, 6, 8]
    seconds = [c["seconds"] for c in points]
    assert seconds == sorted(seconds) and seconds[-1] <= r["seconds"] + 1e-3
    assert all(c["fps_since_previous"] > 0 and c["rss_mb"] > 0 and c["rss_peak_mb"] > 0 for c in points)
    # Every frame is a memory frame; the cap holds the bank at 3 (the masked frame 0 + the 2 newest).
    assert [c["memory_frames"] for c in points] == [2, 3, 3, 3]
    assert points[-1]["working_elements"] == 3 * 4 * 8  # 3 frames of a 4x8 stride-16 grid
    assert "long run (8 frames)" in capsys.readouterr().out


def test_synthetic_clip_is_deterministic_periodic_and_holds_every_object():
    clip = synthetic_clip(48, 3, 8, torch.device("cpu"), period=4)
    again = synthetic_clip(48, 3, 8, torch.device("cpu"), period=4)
    assert clip.frames.shape == (8, 3, *synthetic_size(48)) and clip.frames.dtype == torch.uint8
    assert torch.equal(clip.frames, again.frames) and torch.equal(clip.first_mask, again.first_mask)
    assert torch.equal(clip.frames[4], clip.frames[0])  # motion period 4: the pool can be cycled seamlessly
    assert not torch.equal(clip.frames[1], clip.frames[0])
    assert torch.unique(clip.first_mask).tolist() == [0, 1, 2, 3]
    assert torch.equal(clip.frame(9), clip.frames[1])
    assert synthetic_size(480) == (480, 864)


def test_stage_timer_counts_calls_and_restores_methods():
    net = FakeVOSNet("xmem")
    tracker = Tracker(net, size=None, match_cache_frames=0)
    clip = synthetic_clip(64, 2, 4, torch.device("cpu"))
    timer = StageTimer(lambda: None)
    seconds = bench.run_video(tracker, clip, 4, lambda: None, "fp32", timer=timer)
    assert timer.calls["key_encoding"] == 4 and timer.calls["memory_read"] == 3
    assert 0 < sum(timer.seconds.values()) <= seconds
    for owner, method in ((net, "encode_key"), (net, "decode"), (net, "encode_value"),
                          (tracker.memory, "read"), (tracker.memory, "add")):
        assert method not in vars(owner)  # the class's own method is back


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "stcn-s", "--objects", "0"], "--objects must be at least 1"),
        (["--model", "nope"], "invalid choice"),
        (["--frames", "5"], "Give --model"),
        (["--model", "stcn-s", "--warmup", "-1"], "--warmup must be 0 or more"),
        (["--model", "xmem-s", "--max-memory-frames", "4"], "configures STCN's memory"),
        (["--model", "stcn-s", "--long", "3", "--long-points", "5"], "cannot exceed --long"),
        (["--model", "stcn-s", "--checkpoint", "/no/such.safetensors"], "does not exist"),
    ],
)
def test_bad_arguments_give_one_line_errors(argv, message, capsys):
    try:
        rc = bench.main(argv)
    except SystemExit as exc:  # argparse's own checks
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_compile_failure_is_one_line(monkeypatch, capsys):
    def broken_compile(fn, *args, **kwargs):
        def compiled(*a, **kw):
            raise RuntimeError("no C++ compiler found\nlong backend traceback")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    rc = bench.main(["--model", "stcn-s", "--compile", "--frames", "2", *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: torch.compile failed") and "run without --compile" in err
    assert "\n" not in err and "no C++ compiler found" in err
