"""Paired comparison of two DAVIS evaluations (corrvos/eval/compare.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from corrvos.errors import InputError
from corrvos.eval.compare import comparison_table, main, paired_difference, read_per_object


def _write(folder: Path, rows: dict[str, tuple[float, float]]) -> Path:
    folder.mkdir(parents=True)
    lines = ["Sequence,J-Mean,F-Mean"] + [f"{k},{j:.3f},{f:.3f}" for k, (j, f) in rows.items()]
    (folder / "per-sequence_results.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_a_consistent_gain_is_significant_and_noise_is_not(tmp_path):
    rng = np.random.default_rng(1)
    names = [f"seq{i}_1" for i in range(20)]
    base = {n: (float(j), float(f)) for n, j, f in zip(names, rng.uniform(0.2, 0.7, 20), rng.uniform(0.2, 0.7, 20))}
    # Every object +0.1 J and F, listed in another order: the rows are paired by name, not position.
    better = {n: (base[n][0] + 0.1, base[n][1] + 0.1) for n in reversed(names)}
    noisy = {n: (base[n][0] + s, base[n][1] + s) for n, s in zip(names, [0.05, -0.05] * 10)}
    a = read_per_object(_write(tmp_path / "a", base))
    b = read_per_object(_write(tmp_path / "b", better))
    c = read_per_object(_write(tmp_path / "c", noisy))

    d = paired_difference(a, b, samples=4000)
    assert d.mean == pytest.approx(0.1, abs=1e-9) and d.low == pytest.approx(0.1, abs=1e-9)
    assert (d.better, d.worse) == (20, 0) and d.p_value < 0.001
    n = paired_difference(a, c, samples=4000)
    assert abs(n.mean) < 1e-9 and n.low < 0 < n.high and (n.better, n.worse) == (10, 10) and n.p_value > 0.9

    table = comparison_table([a, b, c], samples=4000)
    assert "| b | " in table and "+0.100 | [+0.100, +0.100] | 20 / 0 | < 0.001 |" in table
    assert table.count("\n") == 4  # header, rule, three runs


def test_mismatched_or_missing_inputs_are_one_sentence(tmp_path, capsys):
    a = read_per_object(_write(tmp_path / "a", {"x_1": (0.5, 0.5), "y_1": (0.4, 0.4)}))
    b = read_per_object(_write(tmp_path / "b", {"x_1": (0.5, 0.5)}))
    with pytest.raises(InputError, match="different objects"):
        paired_difference(a, b)
    assert main([str(tmp_path / "a"), str(tmp_path / "nope")]) == 2
    assert "has no per-sequence_results.csv" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("Sequence,J-Mean,F-Mean\nx_1,abc,0.5\n")
    with pytest.raises(InputError, match="non-numeric"):
        read_per_object(tmp_path / "bad.csv")
    assert main([str(tmp_path / "a"), str(tmp_path / "a"), "--names", "r", "s"]) == 0
    assert "| s | 0.450 |" in capsys.readouterr().out
