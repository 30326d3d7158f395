"""Privacy accounting against Opacus, a published figure, and the Gaussian limit."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from common.privacy import (
    DEFAULT_ORDERS,
    Mechanism,
    Spend,
    epsilon_of,
    gaussian_epsilon,
    noise_for_epsilon,
    skellam_epsilon,
    skellam_rdp,
)
from common.privacy.api import (
    DifferentialPrivacy,
    PrivacyAnalyzer,
    analytic_gaussian_sigma,
    privacy_status,
)


def test_gaussian_accountants_agree_with_opacus_figures() -> None:
    # ../shared/facts.md, measured with Opacus on this machine kind
    assert gaussian_epsilon(1.1, 0.01, 10_000, 1e-5, "rdp") == pytest.approx(5.63, abs=0.01)
    assert gaussian_epsilon(1.1, 0.01, 10_000, 1e-5, "prv") == pytest.approx(5.20, abs=0.02)


def test_rdp_is_at_most_the_moments_accountant_of_abadi_et_al() -> None:
    # Abadi et al., CCS 2016, Sec. 3.1: q = 0.01, sigma = 4, T = 10,000, delta = 1e-5 -> eps ~ 1.26
    eps = gaussian_epsilon(4.0, 0.01, 10_000, 1e-5, "rdp")
    assert 0.9 < eps <= 1.26


def test_noise_for_epsilon_inverts_the_accountant() -> None:
    z = noise_for_epsilon(3.0, 0.02, 2_000, 1e-5)
    assert gaussian_epsilon(z, 0.02, 2_000, 1e-5) <= 3.0
    assert gaussian_epsilon(z * 0.98, 0.02, 2_000, 1e-5) > 3.0


def test_skellam_approaches_the_gaussian_as_variance_grows() -> None:
    gauss = gaussian_epsilon(2.0, 1.0, 50, 1e-5)
    gaps = [skellam_epsilon(2.0, 50, 1e-5, l2, 5258) - gauss for l2 in (16.0, 256.0, 4096.0)]
    assert all(g >= -1e-9 for g in gaps)  # never better than the Gaussian
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-6


def test_skellam_rdp_first_term_is_the_gaussian_rdp() -> None:
    orders = [2.0, 8.0, 32.0]
    rdp = skellam_rdp(orders, variance=1e12, l2=1e6, l1=1e9)
    np.testing.assert_allclose(rdp, [a / 2 for a in orders], rtol=1e-5)


@pytest.mark.parametrize(("z", "q", "steps"), [(1.1, 0.01, 10_000), (0.7, 0.2, 50), (3.0, 1.0, 3)])
def test_rdp_epsilon_is_opacus_rdp_accountants(z: float, q: float, steps: int) -> None:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(z, q, steps)]
    expected = acc.get_epsilon(1e-5, alphas=list(DEFAULT_ORDERS))
    assert gaussian_epsilon(z, q, steps, 1e-5) == pytest.approx(expected, rel=1e-12)
    assert epsilon_of([Spend(Mechanism.GAUSSIAN, z, q, steps)], 1e-5) == pytest.approx(
        expected, rel=1e-12
    )


def test_privacy_estimate_does_not_load_torch() -> None:
    """The estimate needs only Opacus's numpy RDP analysis, not its 4-second training stack."""
    code = (
        "import sys\n"
        "from xeno.cli import main\n"
        "main(['privacy', 'estimate', '--noise-multiplier', '1.1', '--sample-rate', '0.01',"
        " '--steps', '100', '--json'])\n"
        "print(sorted(m for m in ('torch', 'opacus') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_privacy_estimate_cli_json() -> None:
    base = [sys.executable, "-m", "xeno.cli", "privacy", "estimate"]
    out = subprocess.run(
        [
            *base,
            "--mechanism",
            "gaussian",
            "--noise-multiplier",
            "1.1",
            "--sample-rate",
            "0.01",
            "--steps",
            "10000",
            "--delta",
            "1e-5",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["epsilon"] == pytest.approx(5.63, abs=0.01)
    out = subprocess.run(
        [*base, "--target-epsilon", "5.63", "--sample-rate", "0.01", "--steps", "10000", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["noise_multiplier"] == pytest.approx(1.1, abs=0.01)


def test_privacy_estimate_cli_inverts_skellam_too() -> None:
    base = [sys.executable, "-m", "xeno.cli", "privacy", "estimate", "--mechanism", "skellam"]
    common = ["--steps", "20", "--delta", "1e-5", "--dimension", "5000", "--json"]

    def run(*args: str) -> dict[str, float]:
        out = subprocess.run([*base, *args, *common], capture_output=True, text=True, check=True)
        parsed: dict[str, float] = json.loads(out.stdout)
        return parsed

    z = run("--target-epsilon", "3")["noise_multiplier"]
    assert run("--noise-multiplier", str(z))["epsilon"] <= 3.0
    assert run("--noise-multiplier", str(0.98 * z))["epsilon"] > 3.0  # the smallest such noise
    # Skellam approaches the Gaussian from above: it needs at least the Gaussian's noise.
    plain = [sys.executable, "-m", "xeno.cli", "privacy", "estimate"]
    gaussian = subprocess.run(
        [*plain, "--target-epsilon", "3", *common],
        capture_output=True,
        text=True,
        check=True,
    )
    assert z >= json.loads(gaussian.stdout)["noise_multiplier"]


def test_analytic_gaussian_is_tighter_than_the_classic_bound() -> None:
    for eps in (0.1, 0.5, 0.9):
        classic = math.sqrt(2 * math.log(1.25 / 1e-5)) / eps
        assert analytic_gaussian_sigma(eps, 1e-5) <= classic


def test_add_noise_has_the_calibrated_variance() -> None:
    dp = DifferentialPrivacy(epsilon=1.0, delta=1e-5, seed=0)
    noisy = dp.add_noise(np.zeros(200_000), sensitivity=2.0)
    assert np.std(noisy) == pytest.approx(dp.noise_scale(2.0), rel=0.01)


def test_clip_gradients_bounds_the_joint_norm() -> None:
    grads = [np.full(3, 3.0), np.full(4, 4.0)]
    clipped = DifferentialPrivacy.clip_gradients(grads, max_norm=1.0)
    assert math.sqrt(sum(float(np.sum(g * g)) for g in clipped)) == pytest.approx(1.0)
    small = DifferentialPrivacy.clip_gradients(np.array([0.1, 0.2]), max_norm=1.0)
    np.testing.assert_array_equal(small, [0.1, 0.2])


def test_composition_is_correct_not_the_seed_figure() -> None:
    analyzer = PrivacyAnalyzer()
    result = analyzer.compute_privacy_budget(epsilon=1.0, num_queries=100)
    assert result["total_epsilon"] == 100.0 and result["composition"] == "basic"
    small = analyzer.compute_privacy_budget(epsilon=0.01, num_queries=10_000)
    assert small["composition"] == "advanced" and small["total_epsilon"] < 100 * 0.01 * 100


def test_privacy_report_and_status() -> None:
    analyzer = PrivacyAnalyzer()
    for _ in range(5):
        analyzer.log_privacy_operation("model_training", epsilon_used=0.1, data_accessed=500)
    report = analyzer.get_privacy_report()
    assert report["total_operations"] == 5
    assert report["total_epsilon_used"] == pytest.approx(0.5)
    assert report["privacy_status"] == "strong"
    assert privacy_status(3.0) == "moderate" and privacy_status(9.0) == "weak"


def _skellam_rdp_by_hand(alpha: float, mu: float, l1: float, l2: float) -> float:
    """Agarwal, Kairouz and Liu (NeurIPS 2021), Theorem 3.5, as printed there.

    Noise Sk(mu, mu) per coordinate (variance 2 mu), L1 and L2 sensitivities l1, l2:
    eps(alpha) <= alpha l2^2 / (4 mu)
                  + min(((2 alpha - 1) l2^2 + 6 l1) / (16 mu^2), 3 l1 / (4 mu)).
    """
    return alpha * l2**2 / (4 * mu) + min(
        ((2 * alpha - 1) * l2**2 + 6 * l1) / (16 * mu**2), 3 * l1 / (4 * mu)
    )


@pytest.mark.parametrize(
    ("alpha", "variance", "l1", "l2", "by_hand"),
    [
        # x = (1, 1, 1, 1): L1 = 4, L2 = 2. mu = 5: 2*4/20 + min(36/400, 12/20) = 0.4 + 0.09
        (2.0, 10.0, 4.0, 2.0, 0.49),
        # mu = 5, alpha = 8: 8*4/20 + min((15*4 + 24)/400, 0.6) = 1.6 + 0.21
        (8.0, 10.0, 4.0, 2.0, 1.81),
        # mu = 1/2 (the second branch of the min): 2*4/2 + min(36/4, 3*4/2) = 4 + 6
        (2.0, 1.0, 4.0, 2.0, 10.0),
        # x = (2, 1): L1 = 3, L2 = sqrt 5. mu = 2: 3*5/8 + min((5*5 + 18)/64, 9/8)
        (3.0, 4.0, 3.0, math.sqrt(5), 15 / 8 + 43 / 64),
    ],
)
def test_skellam_rdp_matches_theorem_3_5_computed_by_hand(
    alpha: float, variance: float, l1: float, l2: float, by_hand: float
) -> None:
    assert _skellam_rdp_by_hand(alpha, variance / 2, l1, l2) == pytest.approx(by_hand)
    [rdp] = skellam_rdp([alpha], variance, l2, l1)
    assert rdp == pytest.approx(by_hand, rel=1e-12)


def test_skellam_epsilon_uses_the_l1_sensitivity_of_an_integer_vector() -> None:
    """skellam_epsilon and the ledger's Spend give the hand-computed bound's epsilon.

    d = 4, L2 = 2: an integer vector's L1 is at most min(sqrt(d) L2, L2^2) = 4. The
    conversion to (epsilon, delta) is Balle et al. 2020, Thm 21, written out here.
    """
    l2, d, delta, steps = 2.0, 4, 1e-5, 3
    z = math.sqrt(10.0) / l2  # variance (z L2)^2 = 10
    orders = np.asarray(DEFAULT_ORDERS, dtype=np.float64)
    rdp = steps * np.array([_skellam_rdp_by_hand(a, 5.0, 4.0, l2) for a in orders])
    eps = rdp + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    by_hand = float(np.min(eps))
    assert skellam_epsilon(z, steps, delta, l2, d) == pytest.approx(by_hand, rel=1e-9)
    spend = Spend(Mechanism.SKELLAM, z, l2_sensitivity=l2, dimension=d, steps=steps)
    assert epsilon_of([spend], delta) == pytest.approx(by_hand, rel=1e-9)
