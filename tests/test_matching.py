"""Matching units by top-k overlap (``tb_convviz.plugin.matching``) and the routes that use it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tb_convviz.plugin.convviz_plugin import MAX_MATCH_UNITS
from tb_convviz.plugin.matching import match_units, max_weight_assignment, overlap_counts
from tb_convviz.reader import read_run
from tb_convviz.synthetic_run import write_synthetic_run
from test_plugin_http import Served
from trained_runs import SEEDS

weights = st.integers(1, 6).flatmap(lambda n: st.integers(n, 6).flatmap(
    lambda m: hnp.arrays(np.int64, (n, m), elements=st.integers(0, 9))))


@settings(max_examples=200, deadline=None)
@given(weights)
def test_assignment_is_one_to_one_and_maximal(w):
    n, m = w.shape
    columns = max_weight_assignment(w)
    assert len(set(columns.tolist())) == n and all(0 <= c < m for c in columns)
    best = max(sum(w[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
    assert w[np.arange(n), columns].sum() == best


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 4), st.randoms(use_true_random=False))
def test_overlap_counts_equal_set_intersections(units_a, units_b, k, random):
    def rows(units):
        return np.array([random.sample(range(-1, 12), k) for _ in range(units)])  # distinct ids, -1 = none

    a, b = rows(units_a), rows(units_b)
    expected = [[len({i for i in x if i >= 0} & set(y.tolist())) for y in b] for x in a]
    assert overlap_counts(a, b).tolist() == expected


def test_assignment_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n <= m"):
        max_weight_assignment(np.zeros((3, 2)))


def test_a_permuted_layer_is_matched_back():
    rng = np.random.default_rng(0)
    a = np.stack([rng.choice(500, 9, replace=False) for _ in range(40)])
    order = rng.permutation(40)
    partner, shared = match_units(a, a[order])
    assert (order[partner] == np.arange(40)).all() and (shared == 9).all()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("matching")
    run = write_synthetic_run(str(logdir / "a"), checkpoints=3, layers=2, units=12, k=4,
                              probe_size=40, image_size=16, seed=7)
    return Served(logdir), run


def test_compare_route_matches_units_one_to_one(served):
    app, run = served
    last = run.steps[-1]
    body = app.json(f"compare?run=a&layer=conv2&step=0&other_step={last}&match=1")
    a = run.records["conv2"][0]["image"]
    b = run.records["conv2"][-1]["image"]
    counts = overlap_counts(a, b)
    partners = [u["other_unit"] for u in body["units"]]
    assert body["matched"] is True and sorted(partners) == list(range(12))
    assert sum(counts[i, j] for i, j in enumerate(partners)) == max_total(counts)
    for u in body["units"]:
        shared = sorted(set(a[u["unit"]].tolist()) & set(b[u["other_unit"]].tolist()) - {-1})
        assert u["shared"] == shared and u["overlap"] == len(shared) / 4
        assert [int(a[u["unit"], r]) for r in u["ranks"]] == shared
        assert [int(b[u["other_unit"], r]) for r in u["other_ranks"]] == shared
    assert body["unique"] == sum(u["overlap"] == 0 for u in body["units"])
    plain = app.json(f"compare?run=a&layer=conv2&step=0&other_step={last}")
    assert plain["matched"] is False and [u["other_unit"] for u in plain["units"]] == list(range(12))
    assert body["unit_for_unit_mean_overlap"] == pytest.approx(plain["mean_overlap"])
    assert body["mean_overlap"] >= plain["mean_overlap"]
    assert app.json("compare?run=a&layer=conv2&other_step=0&match=2", status=400)["error"].startswith("Invalid")


@pytest.mark.parametrize("match", [0, 1])
def test_compare_pages_follow_the_order_shown(served, match):
    app, run = served
    query = f"compare?run=a&layer=conv2&step=0&other_step={run.steps[-1]}&match={match}"
    whole = app.json(query)
    by_unit = {u["unit"]: u for u in whole["units"]}
    # Every page carries each unit's shared count and partner, enough to count and sort them all.
    assert whole["shared_counts"] == [round(by_unit[u]["overlap"] * 4) for u in range(12)]
    assert whole["other_units"] == [by_unit[u]["other_unit"] for u in range(12)]
    for order, key in [("unit", lambda u: u["unit"]), ("change", lambda u: (u["overlap"], u["unit"]))]:
        expected = sorted(whole["units"], key=key)
        assert len({u["overlap"] for u in expected}) > 1  # the order is not the unit order by accident
        pages = [app.json(f"{query}&order={order}&offset={offset}&limit=5") for offset in range(0, 12, 5)]
        assert [len(p["units"]) for p in pages] == [5, 5, 2]
        assert [u for p in pages for u in p["units"]] == expected
        assert all(p["order"] == order and p["shared_counts"] == whole["shared_counts"] for p in pages)
        assert all(p["mean_overlap"] == whole["mean_overlap"] and p["unique"] == whole["unique"] for p in pages)
    assert "order" in app.json(f"{query}&order=peak", status=400)["error"]


def max_total(counts: np.ndarray) -> int:
    """The best total of a one-to-one assignment, by branch and bound (12! permutations are too many)."""
    n = len(counts)
    best = [0]

    def search(row, used, total):
        if total + counts[row:].max(axis=1).sum() <= best[0]:
            return  # bound: even the best remaining columns cannot beat what was found
        if row == n:
            best[0] = total
            return
        for col in np.argsort(-counts[row]):
            if col not in used:
                search(row + 1, used | {int(col)}, total + int(counts[row, col]))

    search(0, frozenset(), 0)
    return best[0]


def test_stats_report_overlap_with_the_final_checkpoint(served):
    app, run = served
    body = app.json("stats?run=a")
    for layer in body["layers"]:
        records = run.records[layer["name"]]["image"]
        final = records[-1]
        expected = [np.mean([len(set(s[u]) & set(final[u])) / 4 for u in range(12)]) for s in records]
        assert layer["final_overlap"] == pytest.approx(expected)
        assert layer["final_overlap"][-1] == 1.0


def test_matched_overlap_beats_unit_for_unit_across_two_trained_seeds(two_seeds):
    """Two short trainings of the demo net from different seeds: matching finds the shared features."""
    app = Served(two_seeds)
    runs = {seed: read_run(str(two_seeds / f"seed{seed}")) for seed in SEEDS}
    step = runs[0].steps[-1]
    for layer in ("features.relu1", "features.relu5"):
        query = f"compare?run=seed0&layer={layer}&step={step}&other_run=seed1&other_step={step}"
        plain, matched = app.json(query), app.json(query + "&match=1")
        assert matched["mean_overlap"] > plain["mean_overlap"], (layer, matched["mean_overlap"], plain["mean_overlap"])
        # The unit-for-unit number from the records themselves, independently of the route.
        a, b = runs[0].topk(layer, step).image, runs[1].topk(layer, step).image
        assert plain["mean_overlap"] == pytest.approx(np.mean([len(set(x) & set(y)) for x, y in zip(a, b)]) / a.shape[1])


def test_matching_a_layer_wider_than_the_limit_is_refused_with_the_way_out(tmp_path):
    write_synthetic_run(str(tmp_path / "wide"), checkpoints=2, layers=1, units=MAX_MATCH_UNITS + 1, k=2,
                        probe_size=64, image_size=8, seed=1)
    app = Served(tmp_path)
    error = app.json("compare?run=wide&layer=conv1&other_step=0&match=1", status=400)["error"]
    assert f"{MAX_MATCH_UNITS + 1} units" in error and "match=0" in error
    assert len(app.json("compare?run=wide&layer=conv1&other_step=0")["units"]) == MAX_MATCH_UNITS + 1
