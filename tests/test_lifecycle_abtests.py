"""A/B tests over the server's store: sticky assignment, Welch analysis, SRM, end, bad input."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from scipy import stats

from common.models import ModelSpec, build_model
from common.pb import admin_pb2 as pb
from common.pb import admin_pb2_grpc
from server.errors import ErrorKind, FederationError
from server.lifecycle.abtests import assign
from xeno.model_versioning import ABTestingManager, ModelVersionControl

SPEC = ModelSpec("mlp", {"input_dim": 4, "hidden": [3], "num_classes": 2})


@pytest.fixture
def ab(db_url: str) -> ABTestingManager:
    vcs = ModelVersionControl(db=db_url)
    for seed in (1, 2, 3):
        vcs.create_version("clf", build_model(SPEC, seed=seed), "test")
    vcs.tag_version("clf", "production", 1)
    vcs.close()
    manager = ABTestingManager(db=db_url)
    yield manager
    manager.close()


@pytest.mark.parametrize("split", [0.5, 0.1, 0.7])
def test_assignment_respects_the_split_within_one_point(split: float) -> None:
    users = [f"user-{i}" for i in range(100_000)]
    share_a = sum(assign("t", u, split).value == "variant_a" for u in users) / len(users)
    assert abs(share_a - split) < 0.01
    # Another test reshuffles users independently of this one.
    same = sum(assign("t", u, 0.5) == assign("other", u, 0.5) for u in users[:10_000])
    assert abs(same / 10_000 - 0.5) < 0.03


def test_assignment_is_sticky_and_pins_versions(ab: ABTestingManager) -> None:
    test = ab.create_test("t", "clf@production", "clf", 0.3, ["accuracy"])
    assert test["variant_a"] == {"model": "clf", "version": 1, "reference": "clf@production"}
    assert test["variant_b"]["version"] == 3 and test["status"] == "running"
    first = {u: ab.assign_variant("t", u) for u in (f"u{i}" for i in range(500))}
    again = ABTestingManager(store=ab._store)  # another process would agree too: no table
    assert all(again.assign_variant("t", u) == v for u, v in first.items())
    assert all(assign("t", u, 0.3).value == v for u, v in first.items())
    assert ab.create_test("t2", "clf:2", "clf:3", 0.5, ["accuracy"])["variant_a"]["version"] == 2


def test_analysis_matches_scipy_and_declares_winners_only_when_significant(
    ab: ABTestingManager,
) -> None:
    ab.create_test("t", "clf:1", "clf:2", 0.5, ["satisfaction", "latency", "engagement"])
    rng = np.random.default_rng(0)
    sat_a, sat_b = rng.normal(4.0, 0.5, 300), rng.normal(4.2, 0.6, 280)
    lat_a, lat_b = rng.normal(0.20, 0.02, 300), rng.normal(0.25, 0.03, 280)
    eng_a, eng_b = rng.normal(0.5, 0.1, 300), rng.normal(0.5, 0.1, 280)
    for i in range(300):
        ab.record_result(
            "t",
            "variant_a",
            {"satisfaction": sat_a[i], "latency": lat_a[i], "engagement": eng_a[i]},
        )
    for i in range(280):
        ab.record_result(
            "t",
            "variant_b",
            {"satisfaction": sat_b[i], "latency": lat_b[i], "engagement": eng_b[i]},
        )
    out = ab.analyze_test("t")
    sat = out["metrics"]["satisfaction"]
    ref = stats.ttest_ind(sat_b, sat_a, equal_var=False)
    assert sat["variant_a_mean"] == pytest.approx(sat_a.mean(), rel=1e-9)
    assert sat["difference"] == pytest.approx(sat_b.mean() - sat_a.mean(), rel=1e-8)
    assert sat["percent_change"] == round((sat_b.mean() - sat_a.mean()) / sat_a.mean() * 100, 2)
    assert sat["p_value"] == pytest.approx(ref.pvalue, rel=1e-6)
    ci = ref.confidence_interval(0.95)
    assert (sat["ci_low"], sat["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-6)
    assert sat["count_a"] == 300 and sat["count_b"] == 280 and sat["winner"] == "variant_b"
    # Lower latency is better: variant_a wins although its mean is smaller.
    assert out["metrics"]["latency"]["winner"] == "variant_a"
    eng = out["metrics"]["engagement"]
    assert eng["p_value"] > 0.05 and eng["winner"] == "inconclusive"
    assert out["sample_ratio"]["mismatch"] is False


def test_sequential_method_decides_with_the_msprt(ab: ABTestingManager) -> None:
    ab.create_test("t", "clf:1", "clf:2", 0.5, ["s"])
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 1.0, 3000), rng.normal(1.2, 1.0, 3000)
    ab._tests.record_many("t", "variant_a", "s", a)
    ab._tests.record_many("t", "variant_b", "s", b)
    out = ab.analyze_test("t", method="sequential")
    s = out["metrics"]["s"]
    assert out["method"] == "sequential" and s["winner"] == "variant_b"
    from server.lifecycle.stats import msprt

    ref = msprt(3000, a.mean(), a.var(ddof=1), 3000, b.mean(), b.var(ddof=1))
    assert s["sequential_p_value"] == pytest.approx(ref.p_value, rel=1e-6, abs=1e-300)
    assert s["sequential_ci_low"] == pytest.approx(ref.ci_low, rel=1e-6)
    # Welch's figures are reported alongside, whichever method decides.
    assert s["p_value"] < 0.05 and ab.analyze_test("t")["method"] == "welch"


def test_sample_ratio_mismatch_is_flagged(ab: ABTestingManager) -> None:
    ab.create_test("t", "clf:1", "clf:2", 0.5, ["m"])
    ab._tests.record_many("t", "variant_a", "m", np.ones(6000))
    ab._tests.record_many("t", "variant_b", "m", np.ones(4000))
    ratio = ab.analyze_test("t")["sample_ratio"]
    assert ratio["mismatch"] is True and ratio["p_value"] < 1e-10
    assert ratio["count_a"] == 6000 and ratio["observed_share_a"] == 0.6


def test_single_results_are_inconclusive(ab: ABTestingManager) -> None:
    ab.create_test("t", "clf:1", "clf:2", 0.5, ["s"])
    ab.record_result("t", "variant_a", {"s": 4.2})
    out = ab.analyze_test("t")["metrics"]["s"]
    assert out["variant_b_mean"] is None and out["difference"] is None
    ab.record_result("t", "variant_b", {"s": 4.5})
    out = ab.analyze_test("t")["metrics"]["s"]
    assert out["difference"] == 0.3 and out["percent_change"] == 7.14
    assert out["winner"] == "inconclusive" and out["p_value"] is None


def test_end_tags_the_winner_and_stops_the_test(ab: ABTestingManager) -> None:
    ab.create_test("t", "clf:2", "clf:3", 0.5, ["s"])
    ab.record_result("t", "variant_a", {"s": 1.0})
    ended = ab.end_test("t", winner="variant_a")
    assert ended["status"] == "ended" and ended["winner"] == "variant_a"
    vcs = ModelVersionControl(store=ab._store)
    assert vcs.get_tags("clf")["production"] == 2
    with pytest.raises(RuntimeError, match="has ended"):
        ab.assign_variant("t", "u1")
    with pytest.raises(RuntimeError, match="has ended"):
        ab.record_result("t", "variant_a", {"s": 1.0})
    # Retention keeps what A/B tests used, ended or not.
    for seed in range(4, 10):
        vcs.create_version("clf", build_model(SPEC, seed=seed), "test")
    vcs.untag("clf", "production")
    assert set(vcs.prune("clf", keep=1)) == {1, 4, 5, 6, 7, 8}
    assert [v["version"] for v in vcs.list_versions("clf")] == [2, 3, 9]


def test_end_without_a_winner_takes_the_significant_one(ab: ABTestingManager) -> None:
    ab.create_test("t", "clf:1", "clf:2", 0.5, ["s"])
    ab._tests.record_many("t", "variant_a", "s", np.linspace(0, 1, 100))
    ab._tests.record_many("t", "variant_b", "s", np.linspace(0, 1, 100))
    with pytest.raises(RuntimeError, match="no significant winner"):
        ab.end_test("t")
    ab._tests.record_many("t", "variant_b", "s", np.linspace(5, 6, 100))
    assert ab.end_test("t", tag="staging")["winner"] == "variant_b"
    assert ModelVersionControl(store=ab._store).get_tags("clf")["staging"] == 2


BAD = [
    (
        lambda a: a.create_test("x", "clf:1", "clf:2", 0.0, ["s"]),
        ErrorKind.INVALID_ARGUMENT,
        "strictly between 0 and 1",
    ),
    (
        lambda a: a.create_test("x", "clf:1", "clf:2", 1.0, ["s"]),
        ErrorKind.INVALID_ARGUMENT,
        "strictly between 0 and 1",
    ),
    (
        lambda a: a.create_test("x", "clf:1", "clf:2", 1.5, ["s"]),
        ErrorKind.INVALID_ARGUMENT,
        "got 1.5",
    ),
    (
        lambda a: a.create_test("x", "clf:1", "clf:2", math.nan, ["s"]),
        ErrorKind.INVALID_ARGUMENT,
        "traffic_split",
    ),
    (
        lambda a: a.create_test("x", "clf:1", "clf:2", 0.5, []),
        ErrorKind.INVALID_ARGUMENT,
        "non-empty list",
    ),
    (
        lambda a: a.create_test("x", "nope", "clf:2", 0.5, ["s"]),
        ErrorKind.NOT_FOUND,
        "no model 'nope'",
    ),
    (
        lambda a: a.create_test("x", "clf:9", "clf:2", 0.5, ["s"]),
        ErrorKind.NOT_FOUND,
        "no version 9",
    ),
    (
        lambda a: a.create_test("x", "clf@canary", "clf", 0.5, ["s"]),
        ErrorKind.NOT_FOUND,
        "no tag 'canary'",
    ),
    (
        lambda a: a.create_test("live", "clf:1", "clf:2", 0.5, ["s"]),
        ErrorKind.ALREADY_EXISTS,
        "exists",
    ),
    (lambda a: a.assign_variant("nope", "u"), ErrorKind.NOT_FOUND, "no A/B test 'nope'"),
    (lambda a: a.record_result("nope", "variant_a", {"s": 1}), ErrorKind.NOT_FOUND, "no A/B test"),
    (
        lambda a: a.analyze_test("nope"),
        ErrorKind.NOT_FOUND,
        "no A/B test 'nope'; tests: done, live",
    ),
    (lambda a: a.end_test("nope", "variant_a"), ErrorKind.NOT_FOUND, "no A/B test"),
    (
        lambda a: a.record_result("live", "variant_c", {"s": 1}),
        ErrorKind.INVALID_ARGUMENT,
        "variant must be",
    ),
    (
        lambda a: a.record_result("live", "variant_a", {"clicks": 1}),
        ErrorKind.INVALID_ARGUMENT,
        "does not measure 'clicks'; its metrics: s",
    ),
    (
        lambda a: a.record_result("live", "variant_a", {"s": math.inf}),
        ErrorKind.INVALID_ARGUMENT,
        "not finite",
    ),
    (
        lambda a: a.record_result("done", "variant_a", {"s": 1}),
        ErrorKind.FAILED_PRECONDITION,
        "has ended",
    ),
    (lambda a: a.end_test("done", "variant_b"), ErrorKind.FAILED_PRECONDITION, "already ended"),
    (lambda a: a.end_test("live", "variant_c"), ErrorKind.INVALID_ARGUMENT, "winner must be"),
    (lambda a: a.assign_variant("done", "u"), ErrorKind.FAILED_PRECONDITION, "has ended"),
    (
        lambda a: a.analyze_test("live", method="bayes"),
        ErrorKind.INVALID_ARGUMENT,
        "unknown analysis method 'bayes'; choose one of: welch, sequential",
    ),
]


@pytest.mark.parametrize(("call", "kind", "needle"), BAD)
def test_bad_input_is_refused_and_changes_nothing(
    ab: ABTestingManager, call, kind: ErrorKind, needle: str
) -> None:
    ab.create_test("done", "clf:1", "clf:2", 0.5, ["s"])
    ab.end_test("done", "none")
    ab.create_test("live", "clf:1", "clf:2", 0.5, ["s"])
    ab.record_result("live", "variant_a", {"s": 1.0})
    before = (ab.list_tests(), ab.analyze_test("live"), ab.analyze_test("done"))
    tags = ModelVersionControl(store=ab._store).get_tags("clf")
    with pytest.raises(FederationError) as info:
        call(ab)
    assert info.value.kind is kind and needle in str(info.value), str(info.value)
    assert (ab.list_tests(), ab.analyze_test("live"), ab.analyze_test("done")) == before
    assert ModelVersionControl(store=ab._store).get_tags("clf") == tags


def test_over_the_admin_api(server_factory) -> None:
    server = server_factory()
    name = server.config.model
    vcs = ModelVersionControl(store=server.store)
    vcs.create_version(name, build_model(server.coordinator.model.spec, seed=5), "app")
    with grpc.insecure_channel(server.address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        info = admin.CreateAbTest(
            pb.CreateAbTestRequest(
                name="t", model_a=f"{name}:1", model_b=name, traffic_split=0.5, metrics=["s"]
            ),
            timeout=10,
        )
        assert info.variant_b.version == 2 and list(info.metrics) == ["s"]
        got = admin.AssignVariant(pb.AssignVariantRequest(test_name="t", user_id="u1"))
        assert got.variant == assign("t", "u1", 0.5).value
        assert got.arm.version == (1 if got.variant == "variant_a" else 2)
        for arm, values in (("variant_a", [1.0, 1.1, 0.9]), ("variant_b", [2.0, 2.1, 1.9])):
            for v in values:
                admin.RecordAbResult(
                    pb.RecordAbResultRequest(test_name="t", variant=arm, metrics={"s": v})
                )
        out = admin.AnalyzeAbTest(pb.AnalyzeAbTestRequest(test_name="t"))
        s = out.metrics["s"]
        assert s.winner == "variant_b" and s.count_a == 3 and s.difference == pytest.approx(1.0)
        assert s.p_value < 0.05 and s.ci_low < 1.0 < s.ci_high
        # Three results per arm convince Welch at its one planned look, not the sequential
        # test, which must stay valid at every look.
        seq = admin.AnalyzeAbTest(pb.AnalyzeAbTestRequest(test_name="t", method="sequential"))
        assert seq.method == "sequential" and seq.metrics["s"].winner == "inconclusive"
        assert seq.metrics["s"].sequential_p_value > 0.05
        assert seq.metrics["s"].sequential_ci_low < 0 < seq.metrics["s"].sequential_ci_high
        bad = [
            ("AnalyzeAbTest", pb.AnalyzeAbTestRequest(test_name="nope"), "NOT_FOUND"),
            (
                "AnalyzeAbTest",
                pb.AnalyzeAbTestRequest(test_name="t", method="peek"),
                "INVALID_ARGUMENT",
            ),
            (
                "CreateAbTest",
                pb.CreateAbTestRequest(name="u", model_a=name, model_b=name, metrics=["s"]),
                "INVALID_ARGUMENT",  # traffic_split 0
            ),
            (
                "RecordAbResult",
                pb.RecordAbResultRequest(test_name="t", variant="variant_a", metrics={"x": 1}),
                "INVALID_ARGUMENT",
            ),
            ("AssignVariant", pb.AssignVariantRequest(test_name="nope", user_id="u"), "NOT_FOUND"),
            (
                "EndAbTest",
                pb.EndAbTestRequest(test_name="t", winner="variant_z"),
                "INVALID_ARGUMENT",
            ),
        ]
        for method, request, code in bad:
            with pytest.raises(grpc.RpcError) as err:
                getattr(admin, method)(request, timeout=10)
            assert err.value.code().name == code, (method, err.value.details())
        ended = admin.EndAbTest(pb.EndAbTestRequest(test_name="t"))
        assert ended.winner == "variant_b" and ended.status == "ended"
        with pytest.raises(grpc.RpcError) as err:
            admin.RecordAbResult(
                pb.RecordAbResultRequest(test_name="t", variant="variant_a", metrics={"s": 1})
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert [t.name for t in admin.ListAbTests(pb.ListAbTestsRequest()).tests] == ["t"]
    assert vcs.get_tags(name) == {"production": 2}
