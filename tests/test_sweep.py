"""Sweeps and comparison: the grid (parsing, cross product, validation before anything is queued), the ranking,
the overlaid loss curves, and `polyak sweep / compare / cancel --group` against a real server."""

from __future__ import annotations

import itertools
import json
import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import LOCAL_IRIS, deep_merge
from test_service import Server, wait_for

from polyak import BadInput, EpochMetrics, JobInfo, JobSpec, JobState, SpecError
from polyak.cli import cli
from polyak.client.plot import compare_figure
from polyak.client.sweep import (
    RANK_METRICS,
    default_metric,
    default_mode,
    differing_params,
    expand,
    new_group_name,
    parse_grid,
    parse_grid_option,
    plan_sweep,
    rank,
)

# --- the grid ------------------------------------------------------------------------------------------------


def test_grid_values_are_yaml_scalars_and_brackets_keep_lists_whole():
    assert parse_grid_option("optimizer.lr=0.05,2,1e-3, .5") == ("optimizer.lr", [0.05, 2, 0.001, 0.5])
    assert parse_grid_option("optimizer.method=sgd,heavy_ball") == ("optimizer.method", ["sgd", "heavy_ball"])
    assert parse_grid_option("batch.size=null,32") == ("batch.size", [None, 32])
    assert parse_grid_option("data.standardize=true,false") == ("data.standardize", [True, False])
    assert parse_grid_option("model.layers=[4,3],[4, 16, 3]") == ("model.layers", [[4, 3], [4, 16, 3]])


@pytest.mark.parametrize("option, words", [
    ("optimizer.lr", ["expected KEY=V1,V2"]),
    ("optimizer.lr=0.1,,0.2", ["optimizer.lr", "empty value"]),
    ("optimizer.lr=[0.1", ["optimizer.lr", "not a YAML value"]),
])
def test_a_malformed_grid_option_is_named(option, words):
    with pytest.raises(SpecError) as e:
        parse_grid_option(option)
    assert all(w in e.value.message for w in words), e.value.message


def test_the_cross_product_has_every_combination_once():
    grid = {"a": [1, 2, 3], "b": ["x", "y"], "c": [None]}
    combos = expand(grid)
    assert len(combos) == 6
    assert sorted((c["a"], c["b"], c["c"]) for c in combos) == sorted(itertools.product([1, 2, 3], "xy", [None]))


def test_a_plan_sets_exactly_the_grid_values_in_each_spec():
    grid = parse_grid(["optimizer.method=sgd,nesterov", "optimizer.lr=0.05,0.2,1e-2", "batch.size=null,16"])
    plan = plan_sweep(deep_merge(LOCAL_IRIS, {"name": "iris"}), grid, group="g1")
    assert len(plan.trials) == 2 * 3 * 2
    seen = set()
    for t in plan.trials:
        s = t.spec
        seen.add((s.optimizer.method, s.optimizer.lr, s.batch.size))
        assert t.params == {"optimizer.method": s.optimizer.method, "optimizer.lr": s.optimizer.lr,
                            "batch.size": s.batch.size}
        assert s.group == "g1" and s.model.layers == [4, 16, 3]  # everything else as in the base spec
    assert seen == set(itertools.product(["sgd", "nesterov"], [0.05, 0.2, 0.01], [None, 16]))
    names = [t.spec.name for t in plan.trials]
    assert len(set(names)) == len(names) and "iris method=sgd lr=0.05 size=null" in names


def test_the_default_group_is_a_fresh_readable_name():
    a = new_group_name(datetime(2026, 1, 31, 14, 25, 1))
    assert a.startswith("sweep-20260131-142501-") and len(a.rsplit("-", 1)[1]) == 4
    assert plan_sweep(LOCAL_IRIS, {"optimizer.lr": [0.1]}).group.startswith("sweep-")


@pytest.mark.parametrize("grid, words", [
    ({"optimizer.lr": [0.1, -1]}, ["optimizer.lr=-1", "> 0"]),
    ({"optimizer.method": ["sgd", "bogus"]}, ["optimizer.method=bogus", "must be one of", "heavy_ball"]),
    ({"optimizer.lrr": [0.1]}, ["optimizer.lrr", "not a spec field", "lr"]),
    ({"optimizer": [1]}, ["optimizer", "a section"]),
    ({"group": ["a", "b"]}, ["group", "set by the sweep"]),
    ({"optimizer.lr": [0.1, 0.1]}, ["optimizer.lr", "repeats 0.1"]),
    ({"stopping.patience": [3]}, ["stopping.patience=3", "validation"]),  # a cross-field rule
])
def test_a_bad_key_or_value_rejects_the_plan_naming_both(grid, words):
    with pytest.raises(SpecError) as e:
        plan_sweep(LOCAL_IRIS, grid)
    assert all(w in e.value.message for w in words), e.value.message


# --- ranking -------------------------------------------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def info(job_id: str, val_loss: float | None, val_accuracy: float | None = None, epochs: int = 3,
         state: JobState = JobState.SUCCEEDED, validation: float = 0.2) -> JobInfo:
    metrics = None if epochs == 0 else EpochMetrics(
        job_id=job_id, epoch=epochs, step=10 * epochs, samples_seen=1000, batch_size=32, lr=0.1, train_loss=1.0,
        val_loss=val_loss, val_accuracy=val_accuracy, weight_norm=1.0, weight_change=0.1, grad_avg_norm=0.1,
        grad_noise=0.1, samples_per_second=1000.0, elapsed_seconds=1.0, criteria=[])
    spec = JobSpec.model_validate(deep_merge(LOCAL_IRIS, {"data": {"validation_fraction": validation}}))
    return JobInfo(id=job_id, state=state, spec=spec, created_at=T0, started_at=T0,
                   finished_at=T0 + timedelta(seconds=2), epoch=epochs or None, metrics=metrics)


def test_ranking_sorts_by_the_metric_and_puts_jobs_without_it_last():
    infos = [info("a", 0.5, 0.8), info("b", None, epochs=0, state=JobState.CANCELLED), info("c", 0.2, 0.7),
             info("d", math.nan, state=JobState.FAILED), info("e", 0.9, 0.9)]
    params = [{"k": i} for i in range(5)]
    ranked = rank(infos, params)
    assert [r.id for r in ranked] == ["c", "a", "e", "b", "d"]  # val_loss ascending; none / NaN last, in order
    assert ranked[0].params == {"k": 2} and ranked[0].final.val_loss == 0.2 and ranked[0].epochs == 3
    assert ranked[3].final is None and ranked[3].epochs == 0
    assert [r.id for r in rank(infos, params, "val_accuracy")] == ["e", "a", "c", "b", "d"]  # accuracy: max
    assert [r.id for r in rank(infos, params, "val_loss", "max")] == ["e", "a", "c", "b", "d"]
    assert [r.id for r in rank(infos, params, "val_accuracy", "min")] == ["c", "a", "e", "b", "d"]


def test_throughput_ranks_highest_first_by_default_and_every_other_figure_by_its_sense():
    infos = [info("slow", 0.1), info("fast", 0.3), info("mid", 0.2)]
    for job, speed in zip(infos, (500.0, 4000.0, 1500.0), strict=True):
        job.metrics.samples_per_second = speed
    ranked = rank(infos, [{}] * 3, "samples_per_second")
    assert [r.id for r in ranked] == ["fast", "mid", "slow"]
    assert [r.id for r in rank(infos, [{}] * 3, "samples_per_second", "min")] == ["slow", "mid", "fast"]
    # Bigger is better only for accuracy and throughput; every loss, norm, noise and time is smaller-is-better.
    assert {m: default_mode(m) for m in RANK_METRICS} == {
        "val_loss": "min", "train_loss": "min", "val_accuracy": "max", "samples_per_second": "max",
        "weight_change": "min", "grad_avg_norm": "min", "grad_noise": "min", "elapsed_seconds": "min"}


def test_a_bad_metric_or_mode_is_bad_input_naming_the_option():
    with pytest.raises(BadInput, match=r"--metric speed: must be one of val_loss, train_loss"):
        rank([info("a", 0.1)], [{}], "speed")
    with pytest.raises(BadInput, match=r"--mode up: must be min or max"):
        rank([info("a", 0.1)], [{}], "val_loss", "up")


def test_the_default_metric_follows_the_validation_data():
    assert default_metric([info("a", 0.1).spec]) == "val_loss"
    assert default_metric([info("a", None, validation=0.0).spec]) == "train_loss"


def test_differing_params_are_the_fields_that_are_not_all_equal():
    a = JobSpec.model_validate(deep_merge(LOCAL_IRIS, {"name": "a", "group": "g", "optimizer": {"lr": 0.1}}))
    b = JobSpec.model_validate(deep_merge(LOCAL_IRIS, {"name": "b", "group": "g", "model": {"layers": [4, 3]}}))
    assert differing_params([a, b]) == [{"model.layers": [4, 16, 3], "optimizer.lr": 0.1},
                                        {"model.layers": [4, 3], "optimizer.lr": 0.5}]


def test_the_comparison_plot_has_one_distinct_line_per_job_in_each_panel():
    curves = {f"job{j}": [info(f"job{j}", 1.0 / (e + j + 1), epochs=e + 1).metrics for e in range(4)]
              for j in range(6)}
    fig = compare_figure(curves)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["training loss", "validation loss"]
    for ax in axes:
        assert [line.get_label() for line in ax.lines] == list(curves)
        assert len({line.get_color() for line in ax.lines}) == 6
        assert len({line.get_linestyle() for line in ax.lines}) == 4
        assert ax.get_yscale() == "log"
    np.testing.assert_allclose(axes[1].lines[2].get_ydata(), [1 / 3, 1 / 4, 1 / 5, 1 / 6])


# --- against a real server -------------------------------------------------------------------------------------

QUICK = deep_merge(LOCAL_IRIS, {"name": "iris", "data": {"validation_fraction": 0.2}, "stopping": {"max_epochs": 3}})
# In-process and slow enough to be cancelled while it runs: digits, one sample per step.
SLOW = deep_merge(LOCAL_IRIS, {"model": {"layers": [64, 32, 10]}, "data": {"name": "digits"}, "batch": {"size": 1},
                               "stopping": {"max_epochs": 100_000}})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("sweep") / "data", "--max-concurrent-jobs", "2").start()
    yield s
    s.stop()


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "iris.json"
    path.write_text(json.dumps(QUICK))
    return path


def polyak(server: Server, *args: str):
    return CliRunner().invoke(cli, ["--url", server.url, *args])


def test_a_sweep_queues_one_group_with_exactly_the_grid_and_ranks_it(server, spec_file, tmp_path):
    result = polyak(server, "sweep", str(spec_file), "--grid", "optimizer.lr=0.05,0.5",
                    "--grid", "optimizer.method=sgd,heavy_ball", "--json")
    assert result.exit_code == 0, result.output
    group = result.stderr.split()[1].rstrip(":")
    c = server.client()
    jobs = c.list(group=group)
    assert len(jobs) == 4 and {j.group for j in jobs} == {group}
    assert sorted((j.spec.optimizer.lr, j.spec.optimizer.method) for j in jobs) == sorted(
        itertools.product([0.05, 0.5], ["sgd", "heavy_ball"]))
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["id"] for r in rows} == {j.id for j in jobs}
    by_id = {j.id: j for j in jobs}
    for r in rows:
        spec = by_id[r["id"]].spec
        assert r["params"] == {"optimizer.lr": spec.optimizer.lr, "optimizer.method": spec.optimizer.method}
        assert (r["state"], r["stop_reason"], r["epochs"]) == ("succeeded", "max_epochs", 3)
    # Sorted by the last epoch's validation loss, fetched here on its own.
    val_losses = [c.metrics(r["id"])[-1].val_loss for r in rows]
    assert val_losses == sorted(val_losses) and len(set(val_losses)) == 4
    assert [r["final"]["val_loss"] for r in rows] == val_losses

    # compare --group: the same ranking; the table; the curves of all four jobs in one image.
    again = polyak(server, "compare", "--group", group, "--json")
    assert [json.loads(line) for line in again.stdout.splitlines()] == rows
    table = polyak(server, "compare", "--group", group, "-o", str(tmp_path / "curves.png"))
    assert table.exit_code == 0, table.output
    for word in ("ranked by val_loss (min)", "optimizer.lr", "optimizer.method", "heavy_ball", *by_id):
        assert word in table.stdout
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_acc = polyak(server, "compare", rows[0]["id"], rows[1]["id"], "--metric", "val_accuracy", "--json")
    accuracies = [json.loads(line)["final"]["val_accuracy"] for line in by_acc.stdout.splitlines()]
    assert accuracies == sorted(accuracies, reverse=True) and len(accuracies) == 2


def test_a_bad_grid_value_submits_nothing(server, spec_file):
    c = server.client()
    before = len(c.list(limit=10_000))
    bad = (("optimizer.lr=0.1,-1", "optimizer.lr=-1"), ("optimizer.method=sgd,bogus", "optimizer.method=bogus"))
    for grid, named in bad:
        result = polyak(server, "sweep", str(spec_file), "--grid", grid, "--grid", "batch.size=8,16", "--wait")
        assert result.exit_code == 2, result.output
        assert named in result.stderr and "nothing submitted" in result.stderr
    assert len(c.list(limit=10_000)) == before


def test_sweep_follow_prints_a_line_per_job_then_the_ranking(server, spec_file):
    result = polyak(server, "sweep", str(spec_file), "--grid", "optimizer.lr=0.05,0.5", "--follow")
    assert result.exit_code == 0, result.output
    ended = [line for line in result.stdout.splitlines() if "job succeeded (max_epochs)" in line]
    assert len(ended) == 2 and any("lr=0.05" in line for line in ended) and any("lr=0.5" in line for line in ended)
    assert "ranked by val_loss (min)" in result.stdout


def test_cancel_group_cancels_only_that_groups_unfinished_jobs(server, tmp_path):
    c = server.client()
    spec = deep_merge(SLOW, {"optimizer": {"lr": 0.01}})
    sweep = c.sweep(spec, {"model.seed": [1, 2, 3]})
    other = c.submit(deep_merge(SLOW, {"group": "other"}))
    wait_for(lambda: sum(i.state == JobState.RUNNING for i in sweep.infos()) == 2, timeout=30)  # and one queued
    result = polyak(server, "cancel", "--group", sweep.group)
    assert result.exit_code == 0, result.output
    assert f"cancelled 3 jobs of group {sweep.group}" in result.stdout
    final = sweep.wait(timeout=30)
    assert [i.state for i in final] == [JobState.CANCELLED] * 3
    assert other.info().state in (JobState.QUEUED, JobState.RUNNING)
    other.cancel()
    again = polyak(server, "cancel", "--group", sweep.group)
    assert again.exit_code == 0 and "nothing to cancel: all 3 jobs" in again.stdout
    assert polyak(server, "cancel", "--group", "no-such-group").exit_code == 1
    assert polyak(server, "cancel").exit_code == 2


def test_ctrl_c_while_waiting_says_how_to_cancel_the_group(server, spec_file, monkeypatch):
    from polyak.client.sdk import Sweep

    def interrupted(self, timeout=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(Sweep, "wait", interrupted)
    result = polyak(server, "sweep", str(spec_file), "--grid", "optimizer.lr=0.05,0.5", "--group", "ctrl-c", "--wait")
    assert result.exit_code == 130
    assert "polyak cancel --group ctrl-c" in result.stdout
    server.client().cancel_group("ctrl-c")
