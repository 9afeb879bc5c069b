"""The population benchmark (benchmarks/population.py) keeps running and its figures add up.

A ``--quick`` run (256 samples, K = 2) checks that every figure is
produced and that the aggregate rate is K x samples over the median timed
epoch; it asserts nothing about speed.
"""

import json
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import population  # noqa: E402


@pytest.mark.slow
def test_quick_run_produces_every_figure(tmp_path, capsys):
    out = tmp_path / "population.json"
    assert population.main(["--quick", "--k", "2", "--random-data", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["k"] for row in report["rows"]] == [2]
    assert report["config"]["samples"] == population.QUICK_SAMPLES
    assert report["data"].startswith("random") and report["jax_devices"]
    assert report["fit"]["samples_per_s"] > 0
    for row in report["rows"]:
        assert len(row["epoch_seconds"]) == 2  # one warm-up epoch, one timed
        epoch = statistics.median(row["epoch_seconds"][1:])
        assert row["epoch_seconds_median"] == pytest.approx(epoch)
        assert row["aggregate_samples_per_s"] == pytest.approx(
            row["k"] * population.QUICK_SAMPLES / epoch)
        assert row["member_samples_per_s"] == pytest.approx(
            row["aggregate_samples_per_s"] / row["k"])
        assert row["speedup_over_fit"] == pytest.approx(
            row["aggregate_samples_per_s"] / report["fit"]["samples_per_s"])
        assert row["last_epoch_loss_mean"] > 0
    printed = capsys.readouterr().out
    assert "aggregate/s" in printed and "speed-up" in printed


def test_k_list_rejects_bad_entries():
    assert population.parse_args(["--k", "1,16,256"]).k == [1, 16, 256]
    for bad in ("0", "a,b", ""):
        with pytest.raises(SystemExit):
            population.parse_args(["--k", bad])
