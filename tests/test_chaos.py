"""Chaos, short (issue 22): the harness of bench/chaos.py on a real `polyak serve` with its own Ray, one seed, three
faults — a gradient worker, the service (SIGKILL, restarted on its data dir) and a parameter server, each killed at
a moment of the seeded schedule — while a sweep of a sync and an async job runs. Nothing may be lost: the sync job
equals its undisturbed in-process run to 1e-12, the async job's trace replays to its weights with every row applied
once per epoch, histories hold each epoch once, the store passes integrity_check and no process of the run is left.

What a fault hits depends on when it lands (the job may be starting, training or checkpointing): the harness checks
outcomes, never a timing, so every landing must pass. Every wait of the harness has a deadline, shortened here so
that a stall fails the run within minutes, naming what it waited for. The checks are shown to fail on tampered
results.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _chaos import (  # noqa: E402
    KINDS,
    Config,
    Run,
    async_problems,
    differences,
    history_problems,
    schedule,
    sync_problems,
)

from polyak.service.engine.parameter_server import Update  # noqa: E402

pytestmark = pytest.mark.slow

SEED = 5  # its first three faults: a worker, the service, the parameter server
# A job or fault that stalls this long fails the run (the sweep takes about a minute on two cores).
SHORT = Config(seed=SEED, faults=3, target_wait=120, job_timeout=120, sweep_timeout=300)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    run = Run(SHORT, tmp_path_factory.mktemp("chaos"))
    report = run.execute()
    print(f"\nchaos run, seed {SEED}: {report.seconds:.1f} s; {report.summary()}")
    return run, report


def test_the_schedule_is_the_seeds_alone():
    assert schedule(SEED, 3, KINDS, (0.5, 4.0)) == schedule(SEED, 3, KINDS, (0.5, 4.0))
    assert [p.kind for p in schedule(SEED, 3, KINDS, (0.5, 4.0))] == ["worker", "service", "parameter_server"]
    assert schedule(SEED, 3, KINDS, (0.5, 4.0)) != schedule(SEED + 1, 3, KINDS, (0.5, 4.0))


@pytest.mark.timeout(900)
def test_nothing_is_lost_under_a_seeded_run_of_faults(chaos):
    run, report = chaos
    s = report.summary()
    log = (run.folder / "chaos-log.jsonl").read_text()
    assert s["by_kind"] == {"worker": 1, "service": 1, "parameter_server": 1} and s["missed"] == 0, log
    assert s["lost"] == 0, [(c.ids, c.problems) for c in report.chains]
    assert s["sync"] == s["equal_to_reference"] >= 1 and s["async"] == s["replayed_exactly"] >= 1, log
    assert report.leftovers == []
    assert report.integrity == "ok"
    for chain in report.chains:  # a job that failed on the way did so with one line, and its resubmission completed
        assert all(error and "\n" not in error.strip() for error in chain.errors), chain.errors


@pytest.mark.timeout(900)
def test_the_checks_see_a_wrong_history_or_weights(chaos):
    """The sync job's own results, tampered with: each check must fail on them."""
    run, report = chaos
    job = next(c for c in report.chains if c.mode == "sync").evidence
    history, W, best_W, reference = job["history"], job["W"], job["best_W"], run.reference(job["spec"])
    assert sync_problems(history, W, best_W, reference) == []
    nudged = history[1].model_copy(update={"train_loss": history[1].train_loss + 1e-11})
    problems = sync_problems([history[0], nudged, *history[2:]], W, best_W, reference)
    assert [p.split(":")[0] for p in problems] == ["epoch 2.train_loss"], problems
    assert sync_problems(history, W + 1e-11, best_W, reference) == ["final weights differ from the reference by 1e-11"]
    assert sync_problems(history, W, best_W - 1e-11, reference) == ["best weights differ from the reference by 1e-11"]
    assert "repeated [1], missing [2]" in history_problems([history[0], history[0], *history[2:]])[0]
    assert "missing [2]" in history_problems([history[0], *history[2:]])[0]
    assert differences({"a": [1.0, 2.0]}, {"a": [1.0, 2.0 + 1e-13]}) == []


@pytest.mark.timeout(900)
def test_the_replay_sees_a_row_applied_twice_or_an_update_repeated(chaos):
    """The async job's own trace, tampered with: the replay must fail on it."""
    run, report = chaos
    job = next(c for c in report.chains if c.mode == "async").evidence
    spec, trace, history, W = job["spec"], job["trace"], job["history"], job["W"]
    data = run.dataset(spec)
    assert async_problems(spec, trace, history, W, data) == []
    i = max(k for k, r in enumerate(trace) if isinstance(r, Update))  # the last update: the cheapest to replay
    other = next(r for r in range(data.n_train) if r not in trace[i].rows)
    swapped = dataclasses.replace(trace[i], rows=np.r_[other, trace[i].rows[1:]])
    problems = async_problems(spec, [*trace[:i], swapped, *trace[i + 1 :]], history, W, data)
    assert any(f"rows applied twice [{other}]" in p for p in problems), problems
    assert any(p.startswith("replayed weights differ") for p in problems), problems
    repeated = async_problems(spec, [*trace[: i + 1], trace[i], *trace[i + 1 :]], history, W, data)
    assert any("does not follow version" in p for p in repeated), repeated
