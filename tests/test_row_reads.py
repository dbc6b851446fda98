"""``row`` reads each projection once, lists the layer's projections once, and holds no render slot while it reads.

Under the Rust loader every provider call is a round trip to the data server: a row of
128 steps took 13.5 s there, holding a render slot the whole time (issue 19).
"""

from __future__ import annotations

import collections
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend import application
from tensorboard.plugins import base_plugin
from werkzeug import test as werkzeug_test

from crafted_runs import BASE, FIELD, add_projections, field_image
from tb_convviz.plugin import render
from tb_convviz.plugin.convviz_plugin import ConvVizPlugin
from tb_convviz.synthetic_run import write_synthetic_run
from tb_server import get, tensorboard_process, wait_for
from test_plugin_http import API, Served

CHECKPOINTS = 40
STEPS = ",".join(str(10 * i) for i in range(CHECKPOINTS))


class CallCounter:
    """A data provider that counts the calls made to the one it wraps."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.calls: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def __getattr__(self, name):
        method = getattr(self._inner, name)

        def counted(*args, **kwargs):
            with self._lock:
                self.calls[name] += 1
            return method(*args, **kwargs)

        return counted


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    written = write_synthetic_run(str(root / "run"), **{**BASE, "checkpoints": CHECKPOINTS})
    for c, step in enumerate(written.steps):
        images = [field_image(), field_image()]
        add_projections(str(root / "run"), written, [(0, 0), (1, 0)], images, step=step, checkpoint=c)
    return root


@pytest.fixture
def app(logdir):
    served = Served(logdir)
    provider = CallCounter(served.provider._inner)
    plugin = ConvVizPlugin(base_plugin.TBContext(data_provider=provider, flags=served.flags, logdir=str(logdir)))
    return provider, werkzeug_test.Client(application.TensorBoardWSGI([plugin]))


def _png(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return np.asarray(Image.open(io.BytesIO(resp.get_data())))


@pytest.mark.parametrize("scale", ["own", "common"])
def test_a_row_lists_once_and_reads_each_blob_once(app, scale):
    provider, client = app
    client.get(API + "evolution?run=run&layer=conv1&unit=0")  # the layer's records are read (no image); the row then costs its own reads
    provider.calls.clear()
    row = _png(client.get(API + f"row?run=run&layer=conv1&unit=1&steps={STEPS}&scale={scale}"))
    assert row.shape == (FIELD, CHECKPOINTS * (FIELD + 1) - 1, 4) and (row[..., 3] == 255).sum() == \
        CHECKPOINTS * FIELD * FIELD
    assert provider.calls["list_blob_sequences"] <= 2  # the run listing's and the projections'
    assert provider.calls["read_blob"] == 2 * CHECKPOINTS  # each step's index and unit 1's projection


def test_a_row_reads_before_it_takes_a_render_slot(app):
    provider, client = app
    client.get(API + "evolution?run=run&layer=conv1&unit=0")  # the records, without the images topk reads ahead
    for _ in range(render.CONCURRENT_RENDERS):  # every slot taken by other renders
        assert render._renders.acquire(timeout=5)
    answer = {}
    try:
        thread = threading.Thread(target=lambda: answer.setdefault(
            "resp", client.get(API + f"row?run=run&layer=conv1&unit=0&steps={STEPS}")))
        thread.start()
        # Every blob the row needs is read while it waits for a slot.
        wait_for(lambda: provider.calls["read_blob"] >= 2 * CHECKPOINTS, timeout=60, interval=0.05)
        assert thread.is_alive()
    finally:
        for _ in range(render.CONCURRENT_RENDERS):
            render._renders.release()
    thread.join(timeout=120)
    assert _png(answer["resp"]).shape[1] == CHECKPOINTS * (FIELD + 1) - 1


def test_rows_agree_under_both_loaders(logdir):
    route = f"row?run=run&layer=conv1&unit=1&steps={STEPS}&scale=common&size=16"
    rows = []
    for load_fast in (True, False):
        with tensorboard_process(str(logdir), load_fast=load_fast) as tb:
            api = tb.url + API.lstrip("/")
            wait_for(lambda: (lambda r: r[0] == 200 and json.loads(r[2])["runs"]
                              and len(json.loads(r[2])["runs"][0]["steps"]) == CHECKPOINTS)(get(api + "runs")))
            status, _, body = get(api + route)
            assert status == 200, body
            rows.append(np.asarray(Image.open(io.BytesIO(body))))
    np.testing.assert_array_equal(rows[0], rows[1])
    assert (rows[0][..., 3] == 255).sum() == CHECKPOINTS * 16 * 16
