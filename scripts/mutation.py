# ruff: noqa: E501 - the mutant table keeps each test id and source line on one line
"""Mutation run: deliberate one-line bugs in what matters, and whether the tests catch them.

Each mutant names one behaviour a user relies on, one line of one file, the line
it is replaced by, and the tests that should catch it. For each mutant this
script copies the working tree (tracked and untracked, not ignored files: never
the working tree itself), replaces the line in the copy, runs the selected tests
with this interpreter, and restores the line. A mutant is *killed* when its tests
fail and *survives* when they pass. Before the mutants, the same tests run once on
the unmodified copy: they must pass, or no result would mean anything.

    make mutation                       # all mutants (.venv's python)
    python scripts/mutation.py -k dp    # mutants whose name contains "dp"
    python scripts/mutation.py --list

Prints a table and exits 0 when every mutant was killed, 1 when one survived, 2
when a mutant no longer applies (its original line is gone or not unique: update
MUTANTS) or the baseline fails. Add a mutant with every new behaviour worth
guarding: `Mutant(name, file, original line, mutated line, tests)`; lines are
compared without their leading whitespace, and the mutated line keeps the
original's indentation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]


MUTANTS: list[Mutant] = [
    # ---- issue 11: the blind spots a mutation run found
    Mutant(
        "fixed-point range doubled (sums wrap)",
        "common/quantize.py",
        "scale = (HALF_RANGE - 1 - max_clients) / (max_clients * clip_norm)",
        "scale = (2 * HALF_RANGE - 1 - max_clients) / (max_clients * clip_norm)",
        (
            "tests/test_secagg_primitives.py::test_fixed_point_worst_case_sum_of_n_updates_at_the_clip_decodes_to_n_c",
        ),
    ),
    Mutant(
        "central DP noise std not multiplied by the clip",
        "server/rounds/coordinator.py",
        "std = central.update_noise_multiplier * rnd.clip",
        "std = central.update_noise_multiplier",
        (
            "tests/test_dp.py::test_central_dp_clips_every_update_and_adds_noise_of_z_c_over_n_to_the_mean",
        ),
    ),
    Mutant(
        "central DP per-update clipping removed",
        "server/rounds/coordinator.py",
        "if norm > rnd.clip:",
        "if False:",
        (
            "tests/test_dp.py::test_central_dp_clips_every_update_and_adds_noise_of_z_c_over_n_to_the_mean",
        ),
    ),
    Mutant(
        "example-weight cap removed",
        "server/rounds/coordinator.py",
        "weight = min(num_examples, self.config.max_examples_weight)",
        "weight = num_examples",
        ("tests/test_e2e.py::test_example_weight_cap_stops_a_device_claiming_a_billion_examples",),
    ),
    Mutant(
        "FedProx proximal term's sign flipped",
        "client/training.py",
        "torch._foreach_add_(grads, drift, alpha=config.proximal_mu)  # type: ignore[arg-type]",
        "torch._foreach_add_(grads, drift, alpha=-config.proximal_mu)  # type: ignore[arg-type]",
        ("tests/test_training.py",),
    ),
    Mutant(
        "admin token: any non-empty token accepted",
        "server/services/common.py",
        "if token and hmac.compare_digest(token.encode(), known.encode()):",
        "if token:",
        ("tests/test_e2e.py::test_admin_api_refuses_a_wrong_admin_token",),
    ),
    Mutant(
        "Skellam RDP extra term uses L2 for L1",
        "common/privacy/__init__.py",
        "extra = np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))",
        "extra = np.minimum(((2 * a - 1) * l2**2 + 6 * l2) / (4 * variance**2), 3 * l2 / (2 * variance))",
        ("tests/test_privacy.py::test_skellam_rdp_matches_theorem_3_5_computed_by_hand",),
    ),
    # ---- further guards (add yours here)
    Mutant(
        "ledger's Skellam L1 taken as L2",
        "common/privacy/__init__.py",
        "l1 = min(math.sqrt(max(spend.dimension, 1)) * l2, l2**2)",
        "l1 = l2",
        (
            "tests/test_privacy.py::test_skellam_epsilon_uses_the_l1_sensitivity_of_an_integer_vector",
        ),
    ),
    Mutant(
        "FedAvg: updates not weighted by their example count",
        "server/rounds/coordinator.py",
        "vector *= np.float32(weight)",
        "pass",
        ("tests/test_e2e.py::test_each_new_version_is_the_example_weighted_mean_devices_sent",),
    ),
    Mutant(
        "server optimizer state not restored on restart",
        "server/rounds/coordinator.py",
        "self.strategy.load_state_dict(state.arrays)",
        "pass",
        ("tests/test_recovery.py::test_server_optimizer_state_survives_sigkill_between_rounds",),
    ),
    Mutant(
        "SecAgg: a late device of a completed round is told 'closed'",
        "server/rounds/coordinator.py",
        "if done is not None and device_id in done[1]:",
        "if False:",
        (
            "tests/test_secagg.py::test_a_device_that_uploaded_learns_its_round_completed_without_its_shares",
        ),
    ),
    # ---- issue 13: several models on one server
    Mutant(
        "models: a device is offered every model, whatever data it holds",
        "server/runner.py",
        "return [m.coordinator for m in self.models() if m.task is None or m.task in kinds]",
        "return [m.coordinator for m in self.models()]",
        ("tests/test_models.py::test_a_mixed_fleet_trains_two_models_at_once",),
    ),
    Mutant(
        "models: pause leaves the model running",
        "server/rounds/coordinator.py",
        "self._paused = True",
        "self._paused = False",
        ("tests/test_models.py::test_pause_stops_one_models_rounds_and_resume_restarts_them",),
    ),
    Mutant(
        "models: the pause state is not restored on restart",
        "server/app.py",
        "if definition.paused:",
        "if False:",
        ("tests/test_models.py::test_a_restart_restores_every_model_and_its_pause_state",),
    ),
]


def _copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked + untracked, minus ignored) into dest."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = raw.decode()
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted in the working tree but still in the index
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def _apply(text: str, mutant: Mutant) -> str:
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.strip() == mutant.original.strip()]
    if len(hits) != 1:
        raise LookupError(f"{len(hits)} lines of {mutant.path} match the original line")
    line = lines[hits[0]]
    indent = line[: len(line) - len(line.lstrip())]
    ending = "\n" if line.endswith("\n") else ""
    lines[hits[0]] = indent + mutant.mutated.strip() + ending
    return "".join(lines)


def _run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        rc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            cwd=tree,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        ).returncode
    except subprocess.TimeoutExpired:
        rc = -1
    return rc, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.k.lower() in m.name.lower()]
    if args.list:
        for m in mutants:
            print(f"{m.name}\n    {m.path}: {m.original.strip()}\n    -> {m.mutated.strip()}")
        return 0
    status = 0
    with tempfile.TemporaryDirectory(prefix="xeno-mutation-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        selected = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        rc, seconds = _run_tests(tree, selected, args.timeout)
        if rc != 0:
            print(f"baseline: the selected tests fail on the unmodified tree (rc {rc})")
            return 2
        print(f"baseline: {len(selected)} test selections pass unmodified ({seconds:.0f} s)\n")
        rows: list[tuple[str, str, str, str]] = []
        for m in mutants:
            target = tree / m.path
            original = target.read_text()
            try:
                target.write_text(_apply(original, m))
            except LookupError as exc:
                rows.append((m.name, m.path, "STALE", str(exc)))
                status = 2
                continue
            try:
                rc, seconds = _run_tests(tree, m.tests, args.timeout)
            finally:
                target.write_text(original)
            if rc == 0:
                verdict = "SURVIVED"
                status = max(status, 1)
            else:
                verdict = "killed" if rc > 0 else "killed (timeout)"
            rows.append((m.name, m.path, verdict, f"{seconds:.0f} s"))
            print(f"  {verdict:8}  {m.name}", flush=True)
    print("\n| mutant | file | result | time |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    killed = sum(r[2].startswith("killed") for r in rows)
    print(f"\n{killed} of {len(rows)} mutants killed")
    return status


if __name__ == "__main__":
    sys.exit(main())
