"""The one ``corrvos`` command: every subcommand reaches its module, errors are one sentence with exit status 2."""
import importlib
import subprocess
import sys

import pytest

from corrvos import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_has_a_main_and_a_help(name, capsys):
    module = importlib.import_module(cli.COMMANDS[name][0])
    assert callable(module.main)
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_errors_are_one_sentence(tmp_path, capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    status = cli.main(["infer", "--checkpoint", str(tmp_path / "missing.safetensors"), "--video",
                       str(tmp_path / "v.mp4"), "--mask", str(tmp_path / "m.png"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2 and "does not exist" in err and "Traceback" not in err


def test_an_error_a_command_lets_through_is_caught_by_the_front_end(monkeypatch, capsys):
    from corrvos import weights

    def fail(argv):
        raise weights.DownloadError("Cannot reach example.org: this machine seems to be offline.")

    monkeypatch.setattr(weights, "main", fail)
    assert cli.main(["weights", "list"]) == 2
    assert capsys.readouterr().err == "error: Cannot reach example.org: this machine seems to be offline.\n"


def test_python_dash_m_corrvos_runs_the_same_front_end():
    out = subprocess.run([sys.executable, "-m", "corrvos", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "weights" in out.stdout and "train" in out.stdout
