"""bench/scaling_model.py's arithmetic: the bytes a step moves, counted by hand, and fits that recover known terms."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import scaling_model as sm  # noqa: E402
from bench_ray import last_shard  # noqa: E402

P = 1000  # parameters
F = sm.FLOAT_BYTES
TERMS = {"compute": {"c0": 2e-4, "cp": 2e-9, "cf": 1.2e-11}, "u0": 1e-4, "u1": 2e-9, "u2": 3e-10,
         "compiled": {"latency": 1e-3, "rate": 4e9, "hop": 4e-4},
         "cross": {"latency": 5e-3, "rate": 2e9, "hop": 7e-4, "name": "channel"}}


def test_one_node_compiled_graph_copies():
    # W written once and read once, the sum written once, K sums read by the one shard
    assert sm.path_bytes(sm.Topology(K=1), P) == (4 * P * F, 0.0)
    assert sm.path_bytes(sm.Topology(K=2), P) == (5 * P * F, 0.0)
    # two shards: half of W written by each, the worker joins the slices, each shard reads K halves
    assert sm.path_bytes(sm.Topology(K=2, S=2), P) == pytest.approx(((0.5 + 1 + 1 + 1 + 1) * P * F, 0.0))


def test_cross_node_bytes_with_and_without_per_node_combining():
    # two nodes of one worker, one shard: the shard sends W twice and takes two parts
    assert sm.path_bytes(sm.Topology(K=2, path="cross", per_node=(1, 1)), P) == (0.0, 4 * P * F)
    # one node of 16: W and one part cross the link, the leader forwards W to 15 followers and takes 15 sums
    assert sm.path_bytes(sm.Topology(K=16, path="cross", per_node=(16,)), P) == (30 * P * F, 2 * P * F)
    # 32 workers on 2 nodes, 4 shards: a shard moves 2 slices of P/4 each way, fewer than a node's P
    assert sm.path_bytes(sm.Topology(K=32, S=4, path="cross", per_node=(16, 16)), P)[1] == 2 * P * F
    # without combining the one shard takes 32 parts (W still goes once a node)
    uncombined = sm.Topology(K=32, path="cross", per_node=(16, 16), combine=False)
    assert sm.path_bytes(uncombined, P) == (0.0, (2 + 32) * P * F)


def test_spread_and_the_server_link_shrink_with_shards():
    assert sm.spread(20, 16) == (16, 4) and sm.spread(32, 16) == (16, 16) and sm.spread(3, 16) == (3,)
    one, eight = (sm.step_parts(TERMS, sm.M256, 1024, sm.Topology(256, S, "cross", sm.spread(256, 16)), 1.25e9)
                  for S in (1, 8))
    assert one["server_link"] == pytest.approx(8 * eight["server_link"])
    # 16 nodes, one part and one W each way a node, at the 1.25 GB/s of the link
    assert one["server_link"] == pytest.approx(32 * sm.param_count(list(sm.M256)) * F / 1.25e9)


def test_flops_per_row_counts_the_first_layer_without_its_input_gradient():
    # 784-256-10: forward and weight gradient of both layers (4 each), the delta sent back only into the hidden one
    assert sm.flops_per_row(sm.M256) == 4 * 784 * 256 + 6 * 256 * 10
    assert sm.flops_per_row([5, 3]) == 4 * 15
    assert sm.compute_basis([5, 3], 7) == [1.0, 18.0, 420.0]  # p = 5 * 3 + 3


def test_the_relative_fit_weighs_every_row_alike():
    # y = 1 and y = 100 at x = 0 and x = 1, and a third point off the line: by relative error the small rows
    # count as much as the big one, so the fit is the closed form of weighted least squares with weights 1 / y^2
    x, y = np.array([0.0, 1.0, 2.0]), np.array([1.0, 100.0, 150.0])
    A = np.column_stack([np.ones(3), x])
    weights = np.diag(1 / y**2)
    closed = np.linalg.solve(A.T @ weights @ A, A.T @ weights @ y)
    assert sm.fit_line(x, y) == pytest.approx(tuple(closed), rel=1e-9)
    # and the unweighted line (which the 150 pulls) is a different one
    assert sm.fit_line(x, y) != pytest.approx(tuple(np.polyfit(x, y, 1)[::-1]), rel=1e-2)


def test_the_fits_recover_the_terms_that_made_the_rows():
    rows = [sm.row(m, b, 10, 1, path=path) for path in ("compiled", "cross") for m, b in
            ((sm.M64, 128), (sm.M256, 128), (sm.M256, 1024), (sm.M1024, 128))]
    rows += [sm.row(sm.M256, 128, 10, 1, S=2, path=path) for path in ("compiled", "cross")]
    for r in rows:
        r.update(sm.predict_row(TERMS, r))
    fitted = sm.fit_terms(rows, TERMS["u2"])
    for key in ("u0", "u1"):
        assert fitted[key] == pytest.approx(TERMS[key], rel=1e-6)
    assert fitted["compute"] == pytest.approx(TERMS["compute"], rel=1e-6)
    for path in ("compiled", "cross"):
        for key in ("latency", "rate", "hop"):
            assert fitted[path][key] == pytest.approx(TERMS[path][key], rel=1e-6)


def test_contention_slows_the_concurrent_work_of_the_rows_that_run_it():
    measured = {"compute": {sm.compute_key(sm.M256, 512, 2): 1.5}, "update": {sm.update_key(sm.M256, 2, 2): 1.25}}
    both, alone = sm.row(sm.M256, 1024, 10, 2, S=2), sm.row(sm.M256, 1024, 10, 1, S=2)
    slowed_row, alone["contention"] = both | {"contention": measured}, measured
    assert sm.row_slowdown(slowed_row) == (1.5, 1.25)
    assert sm.row_slowdown(both) == (1.0, 1.0)  # nothing measured: nothing slowed
    assert sm.row_slowdown(alone) == (1.0, 1.0)  # one worker computes alone; its shards' key was never measured
    plain, slowed = sm.predict_row(TERMS, both), sm.predict_row(TERMS, slowed_row)
    assert slowed["compute"] == pytest.approx(1.5 * plain["compute"])
    assert slowed["update"] == pytest.approx(1.25 * plain["update"])
    assert slowed["comm"] == plain["comm"]
    # what the rows run at once: K calls of n'/K rows, S shards' updates of K parts (one a node across nodes)
    needs = sm.concurrent_work([both, alone, sm.row(sm.M256, 1024, 10, 2, S=2, path="cross", per_node=(1, 1))])
    assert needs == {"compute": [(sm.M256, 512, 2)], "update": [(sm.M256, 2, 1), (sm.M256, 2, 2)]}


def test_slowdown_and_overlap_from_timings():
    times = [("alone", 1.0), ("alone", 3.0), ("alone", 2.0), ("together", 3.0), ("together", 5.0)]
    assert sm.slowdown_of(times) == pytest.approx(4.0 / 2.0)
    # step 0 is left out; step 1: the other call ran the whole last call; step 2: 1 s of the last call's 4
    side_by_side = [[(0, 1), (0.0, 2.0), (10.0, 12.0)], [(0, 1), (0.5, 2.5), (11.0, 15.0)]]
    assert sm.compute_overlap(side_by_side) == pytest.approx(np.median([1.5 / 2.0, 1.0 / 4.0]))
    staggered = [[(0, 1), (0.0, 1.0)], [(0, 1), (1.0, 2.0)]]
    assert sm.compute_overlap(staggered) == 0.0


def test_validation_flags_rows_beyond_the_bound():
    good, bad = sm.row(sm.M256, 1024, 10, 2), sm.row(sm.M256, 512, 10, 2)
    good.update(sm.predict_row(TERMS, good))
    bad.update({k: v * 2 for k, v in sm.predict_row(TERMS, bad).items()})
    lines, errors = sm.validation_lines(TERMS, [good, bad])
    assert errors == pytest.approx([0.0, -0.5])
    assert not lines[1].endswith("!") and lines[2].endswith("!")
    assert np.isfinite(errors).all()


def test_a_row_measured_in_rounds_is_judged_by_the_median_of_its_errors():
    rounds = []
    for i, factor in enumerate((1 / 1.1, 1 / 1.6, 1 / 0.95), start=1):  # errors +10%, +60%, -5%
        r = sm.row(sm.M256, 1024, 10, 2) | {"round": i}
        rounds.append(r | {k: v * factor for k, v in sm.predict_row(TERMS, r).items()})
    lines, errors = sm.validation_lines(TERMS, rounds)
    assert errors == pytest.approx([0.10])  # one row, the median round; the +60% one alone would fail it
    assert len(lines) == 2 and not lines[1].endswith("!")
    assert "-5%..+60% (3)" in lines[1]
    lines, errors = sm.validation_lines(TERMS, rounds[1:2])
    assert errors == pytest.approx([0.60]) and lines[1].endswith("!")


def test_a_sweep_whose_comm_does_not_grow_with_bytes_is_refused():
    rows = [sm.row(m, 128, 10, 1, path=path) for path in ("compiled", "cross") for m in (sm.M64, sm.M256)]
    for r in rows:
        r.update(sm.predict_row(TERMS, r))
    rows[2]["comm"] = rows[3]["comm"] * 2  # the cross path's small model slower to move than its large one
    with pytest.raises(ValueError, match="comm of the K = 1 cross rows does not grow with the bytes"):
        sm.fit_terms(rows, TERMS["u2"])


def test_a_step_waits_on_one_hop_for_each_actor_beyond_one_worker_and_one_server():
    T = sm.Topology
    assert sm.hops(T(1)) == 0
    assert sm.hops(T(1, S=2)) == 1  # the calibration rows: a second shard
    assert sm.hops(T(2)) == 1  # compiled: the second worker's own channels
    assert sm.hops(T(2, path="cross", per_node=(2,))) == 1  # the leader serves its follower
    assert sm.hops(T(2, S=2, path="cross", per_node=(1, 1))) == 2  # a second node and a second shard
    assert sm.hops(T(32, S=4, path="cross", per_node=(16, 16))) == 3 + 1 + 15
    assert sm.hops(T(32, S=4, path="cross", per_node=(16, 16), combine=False)) == 3 + 31
    # two more workers on the compiled graph: two hops, and the one shard reads two more parts of p floats
    two, four = (sm.step_parts(TERMS, sm.M256, 512, T(k)) for k in (2, 4))
    p, compiled = sm.param_count(list(sm.M256)), TERMS["compiled"]
    assert four["comm"] - two["comm"] == pytest.approx(2 * compiled["hop"] + 2 * p * sm.FLOAT_BYTES / compiled["rate"])


def test_the_shards_timings_merge_into_the_span_each_step_waited_for():
    one = [(None, 0.0, 1.0), (None, 2.0, 3.0)]
    assert last_shard([one]) == one
    other = [(None, 0.1, 1.5), (None, 2.0, 2.5)]  # shard 1 ended last in step 0, shard 0 in step 1
    assert last_shard([one, other]) == [(None, 0.1, 1.5), (None, 2.0, 3.0)]
    # async: pushes pair up worker by worker, in order, whatever the interleaving on each shard
    a = [(0, 0.0, 1.0), (1, 0.5, 0.7), (0, 2.0, 2.2)]
    b = [(1, 0.4, 0.9), (0, 0.0, 0.8), (0, 2.0, 2.6)]
    assert last_shard([a, b]) == [(0, 0.0, 1.0), (0, 2.0, 2.6), (1, 0.4, 0.9)]
    with pytest.raises(ValueError, match="different numbers of updates for None"):
        last_shard([one, one[:1]])
