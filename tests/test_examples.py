"""The README's claims about the example specs, checked by training the example files themselves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from polyak.contract.spec import parse_spec
from polyak.contract.wire import JobState, StopReason
from polyak.service.engine.trainer import train_job

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_steps() -> tuple[int, int]:
    """(heavy ball, GD) steps to loss 1e-8 as the README's examples table states them."""
    found = re.search(r"reaches loss 1e-8 in (\d+) steps, GD with its best step in (\d+)", README)
    assert found, "README no longer states the heavy ball / GD step counts this test checks"
    return int(found[1]), int(found[2])


def test_heavy_ball_reaches_the_target_in_the_steps_the_readme_states_and_gd_in_its_count():
    heavy_ball, gd = readme_steps()
    assert (heavy_ball, gd) == (52, 352)  # the README's claim; the counts below are the runs'
    for name, steps in (("quadratic_heavy_ball.yaml", heavy_ball), ("quadratic_gd.yaml", gd)):
        spec = parse_spec(ROOT / "examples" / name)
        assert spec.batch.size is None and spec.cluster.dtype == "float64"  # full batch: one step an epoch
        result = train_job(spec)
        history = result.metrics
        assert (result.state, result.stop_reason) == (JobState.SUCCEEDED, StopReason.TARGET_LOSS), name
        assert history[-1].step == steps, name
        # the first epoch whose loss is at the target, not a later one
        assert history[-1].train_loss <= 1e-8 < history[-2].train_loss, name


def test_digits_example_reaches_the_readme_accuracy():
    """README: ~98% validation accuracy. The example runs two sync Ray workers; a sync step over K workers is
    the exact minibatch step of one (their gradient sums add up), so it runs here in-process, where only the
    float32 rounding of that sum differs."""
    assert re.search(r"examples/digits\.yaml\).*~98% validation accuracy", README)
    spec = parse_spec(ROOT / "examples" / "digits.yaml")
    assert (spec.cluster.num_workers, spec.cluster.mode, spec.stopping.patience) == (2, "sync", 5)
    spec = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"num_workers": 0})})
    result = train_job(spec)
    assert result.state == JobState.SUCCEEDED
    assert result.stop_reason in (StopReason.EARLY_STOPPING, StopReason.MAX_EPOCHS)
    final = result.metrics[-1].val_accuracy
    print(f"\nexamples/digits.yaml in-process: {len(result.metrics)} epochs, stop {result.stop_reason.value}, "
          f"final val accuracy {final:.4f}")
    assert final == pytest.approx(0.98, abs=0.01)
