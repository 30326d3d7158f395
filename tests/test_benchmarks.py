"""The benchmark scripts run and print the one JSON line the README's figures come from.

Smallest settings only, and no figure is asserted: speed targets live in the
scripts' output, not in timed tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _json_line(*args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    ).stdout.strip()
    assert len(out.splitlines()) == 1, out
    parsed = json.loads(out)
    assert isinstance(parsed, dict)
    return parsed


@pytest.mark.slow
def test_privacy_utility_measures_dp_sgd_overhead() -> None:
    line = _json_line("benchmarks/privacy_utility.py", "--overhead-only")
    assert line["runs"] == []
    assert isinstance(line["dp_sgd_overhead"], float) and line["dp_sgd_overhead"] > 0
    seconds = line["dp_sgd_epoch_seconds"]
    assert isinstance(seconds, dict)
    assert set(seconds) == {"plain_epoch_s", "dp_sgd_epoch_s", "hooks_epoch_s"}


@pytest.mark.slow
def test_secagg_benchmark_reports_a_correct_round() -> None:
    line = _json_line(
        "benchmarks/secagg.py", "--clients", "6", "--params", "1000", "--workers", "1"
    )
    assert line["correct"] is True
    assert isinstance(line["server_cpu_s"], float)


@pytest.mark.slow
def test_poisoning_benchmark_reports_every_run() -> None:
    line = _json_line(
        "benchmarks/poisoning.py", "--devices", "4", "--rounds", "1", "--strategies", "median"
    )
    accuracy = line["accuracy"]
    assert isinstance(accuracy, dict)
    assert set(accuracy["median"]) == {"clean", "scaled", "sign-flipped"}


@pytest.mark.slow
def test_intents_benchmark_measures_dp_sgd_overhead(tmp_path: Path) -> None:
    line = _json_line(
        "benchmarks/intents.py",
        "--parts",
        "overhead",
        "--repeats",
        "1",
        "--results",
        str(tmp_path / "intents.json"),  # never the repository's figures
    )
    assert isinstance(line["dp_sgd_overhead"], float) and line["dp_sgd_overhead"] > 0
    seconds = line["dp_sgd_epoch_seconds"]
    assert isinstance(seconds, dict)
    assert set(seconds) == {"plain_epoch_s", "dp_sgd_epoch_s", "ratio", "hooks_ratio"}


@pytest.mark.slow
def test_intents_benchmark_compares_global_and_personalized_accuracy(tmp_path: Path) -> None:
    line = _json_line(
        "benchmarks/intents.py",
        "--parts",
        "personalization",
        "--users",
        "4",
        "--rounds",
        "1",
        "--local-epochs",
        "1",
        "--personal-epochs",
        "1",
        "--results",
        str(tmp_path / "intents.json"),
    )
    for key in ("mean_global_accuracy", "mean_personalized_accuracy"):
        assert isinstance(line[key], float) and 0 <= line[key] <= 1
    run = line["personalization"]
    assert isinstance(run, dict) and run["users"] == 4 and len(run["accuracy_curve"]) == 2
    fedrep = run["personalization"]
    assert fedrep["method"] == "fedrep"
    assert fedrep["mean_global_accuracy"] == line["mean_global_accuracy"]


@pytest.mark.slow
def test_intents_benchmark_schedules_the_devices_rate_and_epochs(tmp_path: Path) -> None:
    line = _json_line(
        "benchmarks/intents.py",
        "--parts",
        "personalization",
        "--users",
        "3",
        "--rounds",
        "3",
        "--local-epochs",
        "2",
        "--late-local-epochs",
        "1",
        "--late-from",
        "1",
        "--personal-epochs",
        "1",
        "--fed-lr",
        "0.04",
        "--fed-lr-schedule",
        "cosine",
        "--fed-lr-final",
        "0.01",
        "--results",
        str(tmp_path / "intents.json"),
    )
    run = line["personalization"]
    # Rounds 0, 1, 2: t = 0, 1/2, 1 of the half cosine from 0.04 to 0.01.
    assert run["learning_rates"] == pytest.approx([0.04, 0.025, 0.01])
    assert run["learning_rate_schedule"] == "cosine" and run["learning_rate_final"] == 0.01
    assert (run["late_local_epochs"], run["late_from_round"]) == (1, 1)
    assert len(run["accuracy_curve"]) == 2


@pytest.mark.slow
def test_intents_benchmark_dp_part_runs_a_smaller_model_beside_its_reference(
    tmp_path: Path,
) -> None:
    plot = tmp_path / "dp.png"
    line = _json_line(
        "benchmarks/intents.py",
        "--parts",
        "dp",
        "--dp-epsilons",
        "8",
        "--dp-rounds",
        "1",
        "--cohort-1000",
        "2",
        "--dp-buckets",
        "256",
        "--dp-dim",
        "4",
        "--local-epochs",
        "1",
        "--results",
        str(tmp_path / "intents.json"),
        "--plot",
        str(plot),
    )
    runs = line["dp"]
    reference = line["dp_reference"]
    assert isinstance(runs, dict) and isinstance(reference, dict)
    private = runs["8"]
    # 256 x 4 embedding, 150 x 4 head, 150 biases; the reference is the same model, no DP.
    assert private["parameters"] == reference["parameters"] == 256 * 4 + 150 * 4 + 150
    assert (private["buckets"], private["dim"]) == (256, 4)
    assert private["dp"]["epsilon"] <= 8.0 + 1e-6 and "dp" not in reference
    assert line["dp_reference_accuracy"] == reference["accuracy"]
    assert plot.stat().st_size > 0


@pytest.mark.slow
def test_robust_benchmark_times_every_rule() -> None:
    line = _json_line("benchmarks/robust.py", "--clients", "5", "--params", "1000", "--repeat", "1")
    seconds = line["seconds"]
    assert isinstance(seconds, dict)
    assert set(seconds) == {"mean", "median", "trimmed-mean", "krum", "multi-krum"}


@pytest.mark.slow
def test_personalization_benchmark_reports_shares() -> None:
    line = _json_line("benchmarks/personalization.py", "--users", "3", "--interactions", "10")
    assert set(line["share_right_after"]) == {"10"}  # type: ignore[arg-type]
    assert line["target_met"] is False  # fewer than 30 interactions: not measured


@pytest.mark.slow
def test_assistant_latency_benchmark_reports_timings() -> None:
    line = _json_line("benchmarks/assistant_latency.py", "--examples", "60", "--predictions", "50")
    assert isinstance(line["train_seconds_median"], float)
    assert isinstance(line["predict_cpu_ms_p99"], float)


@pytest.mark.slow
def test_retention_benchmark_keeps_the_database_bounded() -> None:
    line = _json_line(
        "benchmarks/retention.py", "--params", "2000", "--rounds", "30", "--keep-versions", "5"
    )
    kept = line["with_retention"]
    assert isinstance(kept, dict) and kept["versions_kept"] < 30 + 1


@pytest.mark.slow
def test_lifecycle_benchmark_reports_each_figure() -> None:
    line = _json_line(
        "benchmarks/lifecycle.py", "--results", "2000", "--points", "500", "--assigns", "1000"
    )
    figures = line["sqlite"]
    assert isinstance(figures, dict)
    assert figures["analyze_results"] == 2000 and figures["get_trend_points"] == 500
    for key in ("assign_variant_per_s", "analyze_test_s", "get_trend_s", "rollback_to_serving_s"):
        assert isinstance(figures[key], int | float) and figures[key] > 0


@pytest.mark.slow
def test_personal_benchmark_compares_body_and_scratch() -> None:
    line = _json_line(
        "benchmarks/personal.py",
        "--users",
        "2",
        "--epochs",
        "1",
        "--finetune-epochs",
        "2",
        "--intents-per-user",
        "3,5",
        "--arms",
        "default,no-prior,body,body+ngrams,finetune-body,finetune-scratch",
    )
    curve = line["by_intents_per_user"]
    assert isinstance(curve, dict) and set(curve) == {"3", "5"}
    assert set(curve["5"]["arms"]) == {
        "default",
        "no-prior",
        "body",
        "scratch",
        "body+ngrams",
        "finetune-body",
        "finetune-scratch",
    }
    # The default's centroid expert is recorded per user; scratch has none to use.
    assert curve["5"]["arms"]["default"]["prior_scale"]["mean"] == 2.0
    assert curve["5"]["arms"]["scratch"]["prior_scale"]["mean"] == 0.0
    assert curve["5"]["default_minus_no_prior_accuracy"] is not None


@pytest.mark.slow
def test_chaos_benchmark_rederives_every_version_under_connection_resets() -> None:
    line = _json_line("benchmarks/chaos.py", "--only", "resets", "--reset-rounds", "2")
    resets = line["resets"]
    assert isinstance(resets, dict) and resets["finished"] is True
    assert resets["versions_mismatched"] == 0 and resets["no_gap"] and resets["no_duplicate"]


@pytest.mark.slow
def test_device_cost_benchmark_splits_a_device_round() -> None:
    line = _json_line(
        "benchmarks/device_cost.py", "--cohorts", "10", "--users", "100", "--repeats", "1"
    )
    assert line["params"] == 400566
    cohort = line["cohorts"]["10"]  # type: ignore[index]
    assert cohort["degree"] == 9 and cohort["secagg_s"] > 0 and cohort["mask_s"] > 0
    assert line["train"]["100"]["train_s"] > 0  # type: ignore[index]
