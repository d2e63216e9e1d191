"""benchmarks/fp8_convergence.py's summary: gaps to the bf16 run of the same seed, and the spread over seeds."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import fp8_convergence as fc  # noqa: E402


def _run(final: float, val: float) -> dict[int, dict[str, float]]:
    rows = {step: {"train/ce_loss": final} for step in range(1, 2 * fc.TAIL)}
    rows[2 * fc.TAIL - 1]["val/loss"] = val
    return rows


def test_summary_pairs_each_fp8_run_with_the_bf16_run_of_its_seed():
    results = {
        "none": _run(5.0, 4.0),
        "none@1": _run(5.1, 4.1),
        "tensorwise": _run(5.05, 4.0),
        "tensorwise@1": _run(5.1, 4.1),
        "blockwise@2": _run(5.0, 4.0),  # no bf16 at seed 2: against seed 0's, and not paired
    }
    text = fc.summary(results)
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert "+1.000 %" in lines["tensorwise"] and lines["tensorwise"].endswith("| bf16 |")
    assert "+0.000 %" in lines["tensorwise@1"] and lines["tensorwise@1"].endswith("| bf16@1 |")
    assert lines["blockwise@2"].endswith("| bf16 |")
    floor = lines["bf16 at other seeds vs bf16 at seed 0 (the noise floor)"]
    assert "| 1 | +2.000 %" in floor
    paired = lines["tensorwise vs bf16 of the same seed"]
    assert "| 2 | +0.500 % | +0.000 % | +1.000 % |" in paired
    assert "blockwise vs bf16 of the same seed" not in lines


def test_summary_without_a_seed_0_run_measures_the_noise_floor_from_the_lowest_seed():
    # One process per seed, as on a shared GPU: its own summary has no seed-0 run (this raised KeyError once).
    text = fc.summary({"none@1": _run(5.0, 4.0), "tensorwise@1": _run(5.05, 4.0)})
    assert "+1.000 %" in text and "noise floor" not in text
    text = fc.summary({"none@2": _run(5.1, 4.0), "none@1": _run(5.0, 4.0), "tensorwise@2": _run(5.1, 4.0)})
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert "| 1 | +2.000 %" in lines["bf16 at other seeds vs bf16 at seed 1 (the noise floor)"]


def test_plot_csv_merges_the_runs_of_one_process_per_seed(tmp_path, capsys):
    for seed in (1, 2):
        fc.write_csv(tmp_path / f"s{seed}.csv", {f"none@{seed}": _run(5.0, 4.0), f"tensorwise@{seed}": _run(5.05, 4.0)})
    fc.main(["--plot-csv", str(tmp_path / "s1.csv"), str(tmp_path / "s2.csv"), "--out", str(tmp_path / "merged")])
    merged = fc.read_csv(tmp_path / "merged" / "fp8_convergence.csv")
    assert sorted(merged) == ["none@1", "none@2", "tensorwise@1", "tensorwise@2"]
    assert "| tensorwise vs bf16 of the same seed | 2 | +1.000 %" in capsys.readouterr().out
