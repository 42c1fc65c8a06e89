"""The memory and precision options shared by infer, eval and bench: parsing, checks, and that they reach the Tracker."""
import argparse

import numpy as np
import pytest

import corrvos
from corrvos.errors import InputError
from corrvos.infer import main as infer_main
from corrvos.io import write_mask, write_video
from corrvos.tracker_options import add_tracker_arguments, given_tracker_options, tracker_options


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_tracker_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_leave_the_tracker_defaults():
    args = _parse()
    assert tracker_options(args) == {}
    assert given_tracker_options(args) == []


def test_given_values_become_tracker_keywords():
    args = _parse("--mem-every", "3", "--top-k", "7", "--min-working-frames", "2", "--max-working-frames", "4",
                  "--num-prototypes", "16", "--max-long-term-elements", "500", "--deep-update-every", "6",
                  "--precision", "bf16")
    assert tracker_options(args, "xmem") == {
        "mem_every": 3, "top_k": 7, "min_working_frames": 2, "max_working_frames": 4, "num_prototypes": 16,
        "deep_update_every": 6, "max_long_term_elements": 500, "precision": "bf16",
    }
    assert given_tracker_options(args) == ["--mem-every", "--top-k", "--min-working-frames", "--max-working-frames",
                                           "--num-prototypes", "--deep-update-every", "--max-long-term-elements",
                                           "--precision"]
    assert tracker_options(_parse("--no-long-term"), "xmem") == {"enable_long_term": False}
    assert tracker_options(_parse("--max-memory-frames", "4"), "stcn") == {"max_memory_frames": 4}


@pytest.mark.parametrize(
    "argv, arch, message",
    [
        (["--mem-every", "0"], None, "--mem-every must be at least 1, not 0."),
        (["--top-k", "-2"], None, "--top-k must be at least 1"),
        (["--max-memory-frames", "1"], None, "--max-memory-frames must be at least 2"),
        (["--min-working-frames", "10"], None, "--min-working-frames (10) must be smaller than --max-working-frames (10)"),
        (["--num-prototypes", "300", "--max-long-term-elements", "200"], None, "must be smaller than --max-long-term-elements"),
        (["--max-memory-frames", "4"], "xmem", "--max-memory-frames configures STCN's memory, but this is an XMem model"),
        (["--num-prototypes", "4"], "stcn", "--num-prototypes configures XMem's memory, but this is an STCN model"),
        (["--no-long-term"], "stcn", "--no-long-term configures XMem's memory"),
        (["--deep-update-every", "2"], "stcn", "--deep-update-every configures XMem's memory"),
        (["--deep-update-every", "0"], None, "--deep-update-every must be at least 1, not 0."),
    ],
)
def test_bad_values_are_one_sentence(argv, arch, message):
    with pytest.raises(InputError) as err:
        tracker_options(_parse(*argv), arch)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_without_long_term_the_consolidation_sizes_are_not_checked():
    # Upstream ignores the working-memory sizes when long-term memory is off; so do we.
    assert tracker_options(_parse("--no-long-term", "--min-working-frames", "9", "--max-working-frames", "3"), "xmem")


def test_infer_passes_xmem_memory_options_to_the_tracker(tmp_path, monkeypatch, capfd):
    import torch

    torch.manual_seed(0)
    ckpt = tmp_path / "xmem-s.safetensors"
    corrvos.save_model(corrvos.build_model("xmem-s"), ckpt)
    frames = []
    for t in range(8):
        f = np.full((64, 96, 3), (60, 90, 60), np.uint8)
        f[10:30, 10 + 3 * t:30 + 3 * t] = (230, 40, 40)
        frames.append(f)
    write_video(tmp_path / "clip.mp4", frames, fps=8)
    mask = np.zeros((64, 96), np.uint8)
    mask[10:30, 10:30] = 1
    write_mask(tmp_path / "mask.png", mask)

    made = []

    class RecordingTracker(corrvos.Tracker):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(corrvos, "Tracker", RecordingTracker)
    code = infer_main(["--checkpoint", str(ckpt), "--video", str(tmp_path / "clip.mp4"), "--mask", str(tmp_path / "mask.png"),
                       "--out", str(tmp_path / "out"), "--device", "cpu", "--size", "-1", "--no-video", "--mem-every", "1",
                       "--min-working-frames", "2", "--max-working-frames", "3", "--num-prototypes", "8",
                       "--max-long-term-elements", "40", "--deep-update-every", "3"])
    assert code == 0, capfd.readouterr().err
    (tracker,) = made
    memory = tracker.memory
    assert (tracker.mem_every, memory.min_working_frames, memory.max_working_frames) == (1, 2, 3)
    assert (memory.num_prototypes, memory.max_long_term_elements, tracker.deep_update_every) == (8, 40, 3)
    assert memory.long_term.size > 0  # 8 memory frames with a working memory of 3: consolidation happened
    assert len(list((tmp_path / "out").glob("*.png"))) == 8


def test_infer_refuses_an_option_of_the_other_architecture(tmp_path, capfd):
    ckpt = tmp_path / "stcn-s.safetensors"
    corrvos.save_model(corrvos.build_model("stcn-s"), ckpt)
    write_video(tmp_path / "clip.mp4", [np.zeros((32, 48, 3), np.uint8)] * 2, fps=8)
    mask = np.zeros((32, 48), np.uint8)
    mask[5:15, 5:15] = 1
    write_mask(tmp_path / "mask.png", mask)
    code = infer_main(["--checkpoint", str(ckpt), "--video", str(tmp_path / "clip.mp4"), "--mask", str(tmp_path / "mask.png"),
                       "--out", str(tmp_path / "out"), "--device", "cpu", "--no-video", "--num-prototypes", "8"])
    err = capfd.readouterr().err.strip()
    assert code == 2 and err == "error: --num-prototypes configures XMem's memory, but this is an STCN model; drop it."


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--results", "r", "--top-k", "5"], "--top-k sets how a model is run, so it needs --checkpoint"),
        (["--checkpoint", "m.safetensors", "--record", "--precision", "bf16"],
         "--record stores the scores of the default memory settings; drop --precision or --record."),
    ],
)
def test_eval_refuses_options_that_cannot_apply(tmp_path, extra, message, capsys):
    from corrvos.eval.__main__ import main as eval_main

    assert eval_main(["--davis", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err


def test_for_architecture_keeps_shared_options_and_those_of_the_architecture():
    from corrvos.tracker_options import for_architecture

    options = tracker_options(_parse("--top-k", "4", "--max-memory-frames", "3", "--num-prototypes", "8", "--no-long-term"))
    assert for_architecture(options, "stcn") == {"top_k": 4, "max_memory_frames": 3}
    assert for_architecture(options, "xmem") == {"top_k": 4, "num_prototypes": 8, "enable_long_term": False}


def test_app_command_line_checks_the_options(capsys):
    from app.__main__ import main as app_main

    with pytest.raises(SystemExit) as exc:
        app_main(["--mem-every", "0", "--device", "cpu"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --mem-every must be at least 1, not 0."


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_run_device_refuses_a_missing_gpu_and_defaults_to_the_cpu():
    from corrvos.tracker_options import run_device

    args = _parse()
    args.device = None
    assert run_device(args) == "cpu"
    args.device = "cuda:0"
    with pytest.raises(InputError, match=r"^--device cuda:0 was asked for but no CUDA GPU is available here; use --device cpu\.$"):
        run_device(args)


def _size_parsers():
    from corrvos.eval.__main__ import build_parser as eval_parser
    from corrvos.eval.youtube import build_parser as youtube_parser
    from corrvos.infer import build_parser as infer_parser
    from corrvos.matches import build_parser as matches_parser

    return {"infer": infer_parser(), "matches": matches_parser(), "eval": eval_parser(), "youtube": youtube_parser()}


@pytest.mark.parametrize("command", ["infer", "matches", "eval", "youtube"])
def test_size_means_the_same_in_every_command(command, capsys):
    from corrvos.tracker_options import processing_size

    parser = _size_parsers()[command]
    size_of = {a.dest: a for a in parser._actions}["size"].type
    # 0 is the input size everywhere; -1, infer's and matches' older spelling, still works in all of them.
    assert size_of("0") == size_of("-1") == 0
    assert processing_size(size_of("0"), preferred=192) is None
    assert processing_size(size_of("240"), preferred=192) == 240
    assert processing_size(None, preferred=192) == 192
    for bad in ("8", "-5", "big"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_known_args(["--size", bad])
        assert exc.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--size" in last and ("at least 16 pixels" in last or "whole number" in last)


def test_app_size_zero_is_the_input_size(monkeypatch):
    import app.__main__ as app_cli

    seen = {}

    class Stop(Exception):
        pass

    def fake_build_demo(config):
        seen["size"] = config.size
        raise Stop

    monkeypatch.setattr("app.ui.build_demo", fake_build_demo)
    for argv, expected in ((["--size", "-1"], 0), (["--size", "0"], 0), (["--size", "320"], 320), ([], None)):
        with pytest.raises(Stop):
            app_cli.main(["--device", "cpu", *argv])
        assert seen["size"] == expected
