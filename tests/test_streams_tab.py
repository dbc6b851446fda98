"""Streams in the tab: the HTTP API's ``source`` parameter, and the Images switch in headless Chromium."""

from __future__ import annotations

import io
import re
import urllib.parse

import numpy as np
import pytest
import torch
from PIL import Image

from browser_support import IDLE, hash_state
from tb_convviz import ConvVizLogger, ProbeSet, read_run
from tb_convviz.demo.model import DemoAlexNet
from tb_convviz.synthetic_run import write_synthetic_run
from tb_server import tensorboard_server
from test_plugin_http import Served

pytestmark = pytest.mark.timeout(300)
LAYER = "features.relu2"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """A demo-like run (the demo's net, 64x64 images, both streams, labelled) and a run without streams."""
    root = tmp_path_factory.mktemp("streams")
    torch.manual_seed(0)
    model = DemoAlexNet(width=8)
    g = torch.Generator().manual_seed(1)
    probe = ProbeSet(torch.rand(16, 3, 64, 64, generator=g), labels=torch.arange(16) % 10,
                     class_names=[str(i) for i in range(10)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with ConvVizLogger(model, probe, str(root / "streams"), layers=DemoAlexNet.LOGGED_LAYERS[:3], k=4,
                       steps=[0, 2], stream=("train", "eval")) as logger:
        for step in range(3):
            model.train()
            x, y = torch.rand(8, 3, 64, 64, generator=g), torch.randint(0, 10, (8,), generator=g)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            logger.maybe_log(step, labels=y)
            model.eval()
            with torch.no_grad():
                model(torch.rand(6, 3, 64, 64, generator=g))
    write_synthetic_run(str(root / "plain"), checkpoints=2, layers=1, units=4, k=4, probe_size=16, image_size=16)
    return root


def test_routes_serve_a_streams_records_and_images(logdir):
    served = Served(logdir)
    runs = {r["run"]: r for r in served.json("runs")["runs"]}
    assert runs["streams"]["streams"] == ["train", "eval"] and runs["plain"]["streams"] == []
    run = read_run(logdir / "streams")
    for source in ("train", "eval"):
        body = served.json(f"topk?run=streams&layer={LAYER}&step=2&source={source}")
        records = run.topk(LAYER, 2, source=source)
        assert [[r["image"] for r in u["records"]] for u in body["units"]] == records.image.tolist()
        # A record's image is the stream's, not the probe image of that number.
        number = int(records.image[0, 0])
        png = served.get(f"probe_image?run=streams&index={number}&source={source}")
        assert png.status_code == 200
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.get_data())).convert("RGB")),
                                      run.stream_image(source, number))
        for route in (f"mosaic?run=streams&layer={LAYER}&unit=0&source={source}",
                      f"patch?run=streams&layer={LAYER}&unit=0&rank=0&source={source}",
                      f"projection?run=streams&layer={LAYER}&step=2&unit=0&source={source}"):
            assert served.get(route).status_code == 200, route
        stats = served.json(f"stats?run=streams&source={source}")["layers"]
        assert len(stats[0]["topk_overlap"]) == 2 and stats[0]["mean_peak"][-1] > 0
    assert "run 'plain' has no 'train' stream" in served.json("topk?run=plain&layer=layer1&source=train",
                                                              status=404)["error"]
    assert "source must be one of" in served.json("topk?run=streams&layer=x&source=bogus", status=400)["error"]


@pytest.fixture(scope="module")
def server(logdir):
    with tensorboard_server(str(logdir), load_fast=True) as url:
        yield url


def test_the_images_switch_in_every_view_and_in_the_url(watched, server):
    page = watched.open(server, f"run=streams&layer={LAYER}")
    page.wait_for_selector(f".cv-grid{IDLE}")
    switch = page.locator(".cv-source-select")
    assert switch.is_enabled() and switch.input_value() == "probe"
    assert "over 16 probe images" in page.locator(".cv-summary").inner_text()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    switch.select_option("train")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert hash_state(page)["source"] == "train"
    assert any("topk?" in u and "source=train" in u for u in requests)
    summary = page.locator(".cv-summary").inner_text()
    assert "over the training images since the previous checkpoint" in summary and "probe" not in summary
    for view in ("evolution", "stability", "compare"):
        requests.clear()
        page.locator(".cv-nav-item", has_text={"evolution": "Fig. 4 grid", "stability": "Stability",
                                               "compare": "Compare"}[view]).click()
        page.wait_for_function("() => !document.querySelector(\"[aria-busy='true']\")")
        assert hash_state(page)["source"] == "train", view
        sent = [u for u in requests if "/data/plugin/convviz/" in u and "runs" not in u and "static" not in u]
        assert sent and all("source=train" in u for u in sent if "filters" not in u), (view, sent)
    # A reload keeps the source; a run without streams shows the switch disabled, with the reason.
    page.reload()
    page.wait_for_selector(".cv-source-select")
    assert page.locator(".cv-source-select").input_value() == "train"
    page.locator(".cv-run-select").select_option("plain")
    page.wait_for_function("() => document.querySelector('.cv-source-select').disabled")
    plain = page.locator(".cv-source-select")
    assert plain.is_disabled() and "no training or validation stream" in plain.get_attribute("title")
    assert "source" not in hash_state(page)
    watched.assert_clean()


def _source_of(url: str) -> str:
    return urllib.parse.parse_qs(urllib.parse.urlparse(url).query).get("source", ["probe"])[0]


def test_the_unit_view_shows_the_probe_set_and_a_stream_side_by_side(watched, logdir, server):
    run = read_run(logdir / "streams")
    mosaics = []
    watched.page.on("request", lambda r: mosaics.append(r.url) if "/mosaic?" in r.url else None)
    page = watched.open(server, f"run=streams&layer={LAYER}&view=unit&unit=1&step=2")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    assert page.locator(".cv-source-panel").count() == 0
    beside = page.locator(".cv-beside-select")
    assert beside.is_enabled() and beside.input_value() == ""
    assert page.locator(".cv-beside-select option[value='probe']").is_disabled()  # the view shows it already
    beside.select_option("train")
    page.wait_for_selector(f".cv-unit-body{IDLE} .cv-source-panel[data-source='train']")
    assert hash_state(page)["beside"] == "train"

    def panels():
        names = page.eval_on_selector_all(".cv-source-panel figcaption strong", "els => els.map(e => e.textContent)")
        assert names == ["Probe set", "Training images"]
        shown = {}
        for source in ("probe", "train"):
            panel = f".cv-source-panel[data-source='{source}']"
            img = page.locator(f"{panel} img.cv-mosaic")
            assert img.evaluate("e => e.complete && e.naturalWidth > 0")
            # The panel's image was asked of its own source, and its records are that source's at step 2.
            assert _source_of(img.get_attribute("src")) == source and img.get_attribute("src") in mosaics
            tips = page.eval_on_selector_all(f"{panel} .cv-cell", "els => els.map(e => e.title)")
            shown[source] = [int(re.search(r"#(\d+)", tip).group(1)) for tip in tips if tip]
            noun = {"probe": "Probe image #", "train": "Training image #"}[source]  # whose image the number is
            assert all(noun in tip for tip in tips if tip), (source, tips)
            assert shown[source] == [i for i in run.topk(LAYER, 2, source=source).image[1].tolist() if i >= 0]
        assert shown["probe"] != shown["train"]

    panels()
    assert {_source_of(u) for u in mosaics} == {"probe", "train"}
    shown_first = run.topk(LAYER, 2, source="train").image[1, 0]
    # The stream's mosaic zooms into the stream's patches.
    page.locator(".cv-source-panel[data-source='train'] .cv-mosaic-frame").click()
    zoomed = page.eval_on_selector_all(".cv-zoom img", "els => els.map(e => e.getAttribute('src'))")
    assert zoomed and all(_source_of(u) == "train" for u in zoomed)
    page.locator(".cv-zoom-open").first.click()  # its whole image, named as a training image
    title = page.locator("dialog.cv-dialog[open] .cv-dialog-head strong").last.inner_text()
    assert title == f"Training image #{shown_first}"
    page.keyboard.press("Escape")
    page.keyboard.press("Escape")
    # The URL round-trips: a reload shows the same two panels.
    page.reload()
    page.wait_for_selector(f".cv-unit-body{IDLE} .cv-source-panel[data-source='train']")
    assert page.locator(".cv-beside-select").input_value() == "train"
    panels()
    # Values the run cannot show are dropped: a source it did not log, or the one the view shows already.
    for wanted in ("bogus", "toString", "eval&source=eval"):
        page = watched.open(server, f"run=streams&layer={LAYER}&view=unit&unit=1&step=2&beside={wanted}")
        page.wait_for_selector(f".cv-unit-body{IDLE}")
        assert "beside" not in hash_state(page) and page.locator(".cv-source-panel").count() == 0, wanted
    # Only the unit view keeps it; a run without streams disables it, saying why.
    page = watched.open(server, f"run=streams&layer={LAYER}&view=unit&unit=1&beside=eval")
    page.wait_for_selector(f".cv-unit-body{IDLE} .cv-source-panel[data-source='eval']")
    page.locator(".cv-back").click()
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert "beside" not in hash_state(page)
    page = watched.open(server, "run=plain&view=unit&unit=0")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    plain = page.locator(".cv-beside-select")
    assert plain.is_disabled() and "no training or validation stream" in plain.get_attribute("title")
    watched.assert_clean()


def test_the_unit_view_says_when_a_streams_images_are_unlabelled(watched, logdir, server):
    """The fixture labels the training stream (maybe_log(labels=y)) and not the validation stream."""
    run = read_run(logdir / "streams")
    train_labels = sorted({int(i) for i in run.topk(LAYER, 2, source="train").label[1] if i >= 0})
    assert train_labels and (run.topk(LAYER, 2, source="eval").label[1] < 0).all()
    page = watched.open(server, f"run=streams&layer={LAYER}&view=unit&unit=1&step=2&source=train")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    shown = page.eval_on_selector_all(".cv-histogram .cv-hist-label", "els => els.map(e => e.textContent)")
    assert sorted(int(name) for name in shown) == train_labels
    page = watched.open(server, f"run=streams&layer={LAYER}&view=unit&unit=1&step=2&source=eval")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    assert page.locator(".cv-histogram").count() == 0
    assert "The validation images are unlabelled" in page.locator(".cv-unit-body").inner_text()
    watched.assert_clean()
