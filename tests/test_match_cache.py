"""``compare?match=1``: each assignment is solved once and cached, and solves wait their turn (issue 19)."""

from __future__ import annotations

import concurrent.futures
import json

import numpy as np
import pytest
from tensorboard.backend import application
from tensorboard.plugins import base_plugin
from werkzeug import test as werkzeug_test

from tb_convviz.plugin import matching
from tb_convviz.plugin.convviz_plugin import ConvVizPlugin
from tb_convviz.synthetic_run import write_synthetic_run
from test_plugin_http import API, Served

MATCH = API + "compare?run=run&layer=conv1&step={}&other_step={}&match=1"


@pytest.fixture
def app(tmp_path):
    written = write_synthetic_run(str(tmp_path / "run"), checkpoints=3, layers=1, units=48, k=4, probe_size=64,
                                  image_size=8)
    served = Served(tmp_path)
    plugin = ConvVizPlugin(base_plugin.TBContext(data_provider=served.provider, flags=served.flags,
                                                 logdir=str(tmp_path)))
    return written, plugin, werkzeug_test.Client(application.TensorBoardWSGI([plugin]))


def _json(resp):
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return json.loads(resp.get_data())


def test_an_assignment_is_solved_once_per_runs_layer_and_steps(app):
    written, plugin, client = app
    first = _json(client.get(MATCH.format(0, 10)))
    partner, _ = matching.match_units(written.records["conv1"][0]["image"], written.records["conv1"][1]["image"])
    assert [u["other_unit"] for u in first["units"]] == partner.tolist()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda _: _json(client.get(MATCH.format(0, 10))), range(4)))
    assert all(a == first for a in again) and plugin._matcher.solves == 1
    _json(client.get(MATCH.format(10, 0)))
    _json(client.get(MATCH.format(0, 20)))
    assert plugin._matcher.solves == 3
    # Paging (offset, limit) reuses the same assignment.
    _json(client.get(MATCH.format(0, 10) + "&offset=5&limit=3"))
    assert plugin._matcher.solves == 3


def test_a_solve_waits_its_turn_and_answers_503_when_it_waited_too_long(app, monkeypatch):
    _, plugin, client = app
    monkeypatch.setattr(matching, "SOLVE_WAIT_S", 0.2)
    slots = plugin._matcher._slots
    for _ in range(matching.CONCURRENT_SOLVES):  # every slot taken by other solves
        assert slots.acquire(timeout=5)
    try:
        resp = client.get(MATCH.format(0, 10))
        assert resp.status_code == 503 and "busy matching" in json.loads(resp.get_data())["error"]
        # Without matching, compare does not wait.
        assert client.get(API + "compare?run=run&layer=conv1&step=0&other_step=10").status_code == 200
    finally:
        for _ in range(matching.CONCURRENT_SOLVES):
            slots.release()
    assert _json(client.get(MATCH.format(0, 10)))["matched"] is True
    assert plugin._matcher.solves == 1


def test_the_cache_key_includes_what_was_matched():
    matcher = matching.CachedMatcher()
    rng = np.random.default_rng(0)
    a, b = rng.permutation(40).reshape(10, 4), rng.permutation(40).reshape(10, 4)
    first = matcher.match("same name", a, b)
    np.testing.assert_array_equal(matcher.match("same name", a, b)[0], first[0])
    assert matcher.solves == 1
    # A run logged again under the same name: same key, other records, solved again.
    other = matcher.match("same name", a, b[::-1])
    assert matcher.solves == 2
    np.testing.assert_array_equal(other[0], matching.match_units(a, b[::-1])[0])
