"""The ConvViz tab in real headless Chromium, against a real ``tensorboard`` process.

Chromium, the watched page and screenshots come from ``browser_support.py`` and
``conftest.py``. Screenshots of every view go to ``$CONVVIZ_SCREENSHOT_DIR`` (default
``tests/artifacts/``, git-ignored). With ``CONVVIZ_SCREENSHOT_LOGDIR`` pointing at a
real run (``tb-convviz demo``), ``test_screenshots_of_a_real_run`` saves the README's
``dashboard.png`` from it.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import pathlib
import urllib.parse

import numpy as np
import pytest

from tb_convviz import ProbeSet, metadata, plugin_data_pb2, summary
from tb_convviz.metadata import topk_overlap
from tb_convviz.synthetic_run import write_synthetic_run
from browser_support import (IDLE, Watched, assert_images_loaded, hash_state, mosaic_sources,
                             screenshot)
from tb_server import get, plugin_json, tensorboard_server, wait_for

HOSTILE_RUN = "<img src=x onerror=alert(1)>"
HOSTILE_LAYER = "<img src=x onerror=alert(2)>\"'" + "-long" * 60
HOSTILE_CLASSES = ["<b>bold</b> & 'quoted'", "\"><script>alert(3)</script>"]
NEWER_RUN = "newer"
WIDE_RUN, WIDE_UNITS = "wide", 512
RUN = "seed0"
CHECKPOINTS = 8
UNITS = 16

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("frontend")
    run = write_synthetic_run(str(logdir / RUN), checkpoints=CHECKPOINTS, layers=3, units=UNITS, k=9,
                              probe_size=96, image_size=32, num_classes=5, seed=1)
    write_run_with_hostile_names(str(logdir / HOSTILE_RUN))
    write_synthetic_run(str(logdir / NEWER_RUN), checkpoints=2, layers=1, units=4, k=4,
                        probe_size=16, image_size=16, seed=3)
    write_layer_from_a_newer_version(str(logdir / NEWER_RUN))
    write_synthetic_run(str(logdir / WIDE_RUN), checkpoints=3, layers=1, units=WIDE_UNITS, k=4,
                        probe_size=64, image_size=16, seed=4)
    return run


def write_run_with_hostile_names(logdir: str) -> None:
    """One checkpoint, logged by the real logger, of a module and classes whose names are HTML."""
    import torch
    from torch import nn

    from tb_convviz import ConvVizLogger, ProbeSet

    model = nn.Sequential()
    model.add_module(HOSTILE_LAYER, nn.Conv2d(3, 4, 3, padding=1))
    torch.manual_seed(0)
    probe = ProbeSet(torch.rand(16, 3, 16, 16), labels=[i % 2 for i in range(16)], class_names=HOSTILE_CLASSES)
    with ConvVizLogger(model, probe, logdir, layers=[HOSTILE_LAYER], k=4, steps=[0]) as logger:
        assert logger.log(0)


def write_layer_from_a_newer_version(logdir: str) -> None:
    """Add a layer ``conv2`` whose plugin data claims a format version this tb-convviz cannot read."""
    info = plugin_data_pb2.LayerInfo(name="conv2", index=2, units=1, k=1)
    pb = summary.topk_pb(info, metadata.encode_records(*(np.zeros((1, 1)),) * 4))
    data = plugin_data_pb2.PluginData(version=metadata.PROTO_VERSION + 1, layer=info)
    pb.value[0].metadata.plugin_data.content = data.SerializeToString()
    writer = summary.EventWriter(logdir)
    writer.write(pb, 0)
    writer.close()


@pytest.fixture(scope="module")
def server(written):
    with tensorboard_server(os.path.dirname(written.logdir), load_fast=True) as url:
        def loaded():
            status, _, body = get(url + "data/plugin/convviz/runs")
            runs = json.loads(body)["runs"] if status == 200 else []
            expected = {RUN: CHECKPOINTS, HOSTILE_RUN: 1, WIDE_RUN: 3}
            return len(runs) == 4 and all(
                len(layer["steps"]) == expected.get(r["run"], 2) for r in runs for layer in r["layers"])

        wait_for(loaded)
        yield url


def test_tab_loads_inside_tensorboard(watched, server, written):
    page = watched.page
    page.goto(server + "#convviz")
    frame = page.wait_for_selector("iframe", timeout=60_000).content_frame()
    assert "plugin_entry.html?name=convviz" in frame.url
    frame.wait_for_selector(f".cv-grid{IDLE}")
    frame.select_option(".cv-run-select", RUN)
    frame.wait_for_function(f"location.hash.includes('run={RUN}&')")
    frame.wait_for_selector(f".cv-grid{IDLE}")
    assert frame.locator(".cv-tile").count() == UNITS
    assert_images_loaded(frame, ".cv-grid .cv-mosaic", UNITS)
    screenshot(page, "tensorboard")
    watched.assert_clean(frame)


def test_grid_shows_loaded_mosaics_with_alt_text(watched, server, written):
    page = watched.open(server, f"run={RUN}&layer=conv1")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert_images_loaded(page, ".cv-grid .cv-mosaic", UNITS)
    tabs = page.locator(".cv-layer-tab").all_inner_texts()
    assert [t.split("\n")[0] for t in tabs] == ["Layer 1", "Layer 2", "Layer 3"]
    assert "conv2" in tabs[1] and "RF 10×10" in tabs[1]
    alt = page.locator(".cv-tile[data-unit='0'] .cv-mosaic").get_attribute("alt")
    top = written.records["conv1"][-1, 0]
    assert alt.startswith(f"Unit 0 at step {written.steps[-1]}")
    assert f"1: {top['value'][0]:.3f} class" in alt  # rank, value and label of the strongest patch
    screenshot(page, "grid")
    watched.assert_clean()


def test_sorting_by_peak_orders_tiles(watched, server, written):
    page = watched.open(server, f"run={RUN}&layer=conv2")
    page.wait_for_selector(f".cv-grid{IDLE}")
    page.select_option(".cv-toolbar select", "peak")
    page.wait_for_function("location.hash.includes('sort=peak')")
    order = [int(u) for u in page.eval_on_selector_all(".cv-tile", "els => els.map(e => e.dataset.unit)")]
    peaks = written.records["conv2"][-1]["value"].max(axis=1)
    assert order == sorted(range(UNITS), key=lambda u: (-peaks[u], u))
    watched.assert_clean()


def test_slider_and_arrow_keys_change_the_images(watched, server, written):
    page = watched.open(server, f"run={RUN}&layer=conv1")
    page.wait_for_selector(f".cv-grid{IDLE}")
    latest = mosaic_sources(page)
    page.keyboard.press("ArrowLeft")
    page.wait_for_function(f"location.hash.includes('step={written.steps[-2]}')")
    page.wait_for_selector(f".cv-grid{IDLE}")
    previous = mosaic_sources(page)
    assert all(f"step={written.steps[-2]}" in src for src in previous)
    assert set(previous).isdisjoint(latest)
    page.locator(".cv-slider input[type=range]").fill("0")
    page.wait_for_function(f"location.hash.includes('step={written.steps[0]}&')")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert all(f"step={written.steps[0]}" in src for src in mosaic_sources(page))
    assert_images_loaded(page, ".cv-grid .cv-mosaic", UNITS)
    assert page.locator(".cv-step-readout").inner_text() == f"step {written.steps[0]}"
    watched.assert_clean()


def test_play_animates_through_training(watched, server, written):
    page = watched.open(server, f"run={RUN}&layer=conv1&step={written.steps[0]}")
    page.wait_for_selector(f".cv-grid{IDLE}")
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => window.__seen.push(document.querySelector('.cv-step-readout').textContent))
            .observe(document.querySelector('.cv-step-readout'), { childList: true, characterData: true, subtree: true });
    }""")
    page.click(".cv-play")
    assert page.locator(".cv-play").get_attribute("aria-label") == "Pause"
    page.wait_for_function("document.querySelector('.cv-play').getAttribute('aria-label') !== 'Pause'", timeout=60_000)
    seen = list(dict.fromkeys(page.evaluate("window.__seen")))
    assert seen == [f"step {s}" for s in written.steps[1:]]
    assert hash_state(page)["step"] == str(written.steps[-1])
    assert all(f"step={written.steps[-1]}" in src for src in mosaic_sources(page))
    watched.assert_clean()


def test_unit_view_has_one_entry_per_checkpoint(watched, server, written):
    page = watched.open(server, f"run={RUN}&layer=conv2")
    page.wait_for_selector(f".cv-grid{IDLE}")
    page.click(".cv-tile[data-unit='3']")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    assert hash_state(page)["view"] == "unit" and hash_state(page)["unit"] == "3"
    columns = page.locator(".cv-evo-col")
    assert columns.count() == CHECKPOINTS
    assert [int(s) for s in columns.evaluate_all("els => els.map(e => e.dataset.step)")] == written.steps
    top1 = written.records["conv2"][:, 3, 0]["image"]
    changed = [written.steps[c] for c in range(1, CHECKPOINTS) if top1[c] != top1[c - 1]]
    assert [int(s) for s in page.eval_on_selector_all(
        ".cv-evo-col.cv-changed", "els => els.map(e => e.dataset.step)")] == changed
    page.wait_for_function("[...document.querySelectorAll('.cv-evo-strip img')].every(i => i.complete)")
    assert_images_loaded(page, ".cv-evo-strip img", CHECKPOINTS)
    labels = written.labels[written.records["conv2"][-1, 3]["image"]]
    histogram = page.locator(".cv-hist-count").all_inner_texts()
    assert sorted(int(c) for c in histogram) == sorted(np.unique(labels, return_counts=True)[1].tolist())
    screenshot(page, "unit")

    page.click("text=Show top-9")
    page.wait_for_function(f"document.querySelectorAll('.cv-evo-strip img').length === {CHECKPOINTS * 9}")
    page.locator(".cv-evo-patch").first.click()
    dialog = page.locator("dialog.cv-dialog")
    dialog.wait_for()
    page.wait_for_function("document.querySelector('.cv-probe-image').complete")
    assert page.eval_on_selector(".cv-probe-image", "i => i.naturalWidth") == 32
    assert f"#{written.records['conv2'][0, 3, 0]['image']}" in dialog.inner_text()
    screenshot(page, "probe_image")
    page.keyboard.press("Escape")
    dialog.wait_for(state="detached")
    watched.assert_clean()


def test_compare_marks_changed_units(watched, server, written):
    page = watched.open(server, f"view=compare&run={RUN}&layer=conv2&other_step={written.steps[3]}&step={written.steps[-1]}")
    page.wait_for_selector(f".cv-compare-grid{IDLE}")
    images = written.records["conv2"]["image"]
    kept = topk_overlap(images[-1], images[3])
    expected = {u for u in range(UNITS) if kept[u] < 0.5}
    assert expected and len(expected) < UNITS  # the data must have both kinds for this test to mean anything
    shown = {int(u) for u in page.eval_on_selector_all(".cv-pair.cv-changed", "els => els.map(e => e.dataset.unit)")}
    assert shown == expected
    order = [int(u) for u in page.eval_on_selector_all(".cv-pair", "els => els.map(e => e.dataset.unit)")]
    assert order == sorted(range(UNITS), key=lambda u: (kept[u], u))  # most changed first
    assert_images_loaded(page, ".cv-compare-grid .cv-mosaic", 2 * UNITS)
    assert f"{len(expected)} of {UNITS} units changed" in page.locator(".cv-summary").inner_text()
    screenshot(page, "compare")
    # Opened from the grid, Compare shows A, the grid's checkpoint, against B, the previous one.
    page.click(".cv-nav-item:text-is('Layers')")
    page.wait_for_selector(f".cv-grid{IDLE}")
    page.click(".cv-nav-item:text-is('Compare')")
    page.wait_for_selector(f".cv-compare-grid{IDLE}")
    state = hash_state(page)
    assert (state["step"], state["b_step"]) == (str(written.steps[3]), str(written.steps[2]))
    watched.assert_clean()


def test_large_layers_load_mosaics_near_the_viewport_only(watched, server):
    requests: list[str] = []
    watched.page.on("request", lambda r: requests.append(urllib.parse.unquote(r.url)))
    steps = next(r for r in plugin_json(server, "runs")["runs"] if r["run"] == WIDE_RUN)["layers"][0]["steps"]
    page = watched.open(server, f"run={WIDE_RUN}&step={steps[1]}")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert page.locator(".cv-tile").count() == WIDE_UNITS
    with_source = "els => els.filter((e) => e.getAttribute('src')).length"
    requested = page.eval_on_selector_all(".cv-grid .cv-mosaic", with_source)
    assert 0 < requested < WIDE_UNITS // 4
    # Only tiles near the window are drawn: a far one has no tooltips or chips yet.
    last_tile = page.locator(f".cv-tile[data-unit='{WIDE_UNITS - 1}']")
    assert last_tile.locator(".cv-cell").count() == 0 and last_tile.locator(".cv-tile-meta").inner_text() == ""
    assert page.locator(".cv-tile[data-unit='0'] .cv-cell").count() == 4
    # Both neighbouring checkpoints are fetched ahead, the next one first: their units, and the mosaics of
    # exactly the tiles near the window.
    near = set(page.eval_on_selector_all(".cv-grid .cv-mosaic[data-near]", "els => els.map((e) => e.closest('.cv-tile').dataset.unit)"))

    def mosaics(step):
        return [dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(u).query))["unit"]
                for u in requests if "/mosaic?" in u and f"step={step}&" in u]

    wait_for(lambda: set(mosaics(steps[0])) == set(mosaics(steps[2])) == near, timeout=30)
    assert all(any("/topk?" in u and u.endswith(f"step={s}") for u in requests) for s in (steps[0], steps[2]))
    ahead = [u for u in requests if "/mosaic?" in u and f"step={steps[1]}&" not in u]
    assert f"step={steps[2]}&" in ahead[0]
    # Switching to one asks for no JSON again, and shows the images fetched ahead without asking again.
    before = len([u for u in requests if "/topk?" in u])
    page.locator("body").press("ArrowLeft")
    page.wait_for_function(f"location.hash.includes('step={steps[0]}')")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert f"step={steps[0]}&" in page.eval_on_selector(".cv-tile[data-unit='0'] .cv-mosaic", "i => i.currentSrc")
    assert len([u for u in requests if "/topk?" in u]) == before
    assert sorted(mosaics(steps[0])) == sorted(near)
    last = last_tile.locator(".cv-mosaic")
    last.scroll_into_view_if_needed()
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=last.element_handle())
    # Drawn once near: its tooltips and chips are there, for the checkpoint shown.
    assert last_tile.locator(".cv-cell").count() == 4 and f"#{WIDE_UNITS - 1}" in last_tile.locator(".cv-tile-meta").inner_text()
    assert f"step={steps[0]}&" in last.evaluate("i => i.currentSrc")
    assert page.eval_on_selector_all(".cv-grid .cv-mosaic", with_source) < WIDE_UNITS // 2
    watched.assert_clean()


def test_compare_of_a_large_layer_loads_a_page_at_a_time(watched, server):
    requests: list[str] = []
    watched.page.on("request", lambda r: requests.append(r.url) if "/compare?" in r.url else None)
    steps = next(r for r in plugin_json(server, "runs")["runs"] if r["run"] == WIDE_RUN)["layers"][0]["steps"]
    whole = plugin_json(server, "compare", run=WIDE_RUN, layer="conv1", step=steps[1], other_step=steps[0])
    expected = [u["unit"] for u in sorted(whole["units"], key=lambda u: (u["overlap"], u["unit"]))]
    assert expected != sorted(expected)  # least shared first is not the unit order here
    page = watched.open(server, f"view=compare&run={WIDE_RUN}&step={steps[1]}&b_step={steps[0]}")
    page.wait_for_selector(f".cv-compare-grid{IDLE}")

    def shown():
        return [int(u) for u in page.eval_on_selector_all(".cv-pair", "els => els.map(e => e.dataset.unit)")]

    assert shown() == expected[:64]
    first = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(requests[0]).query))
    assert (first["limit"], first["order"], first.get("offset", "0")) == ("64", "change", "0")
    # The summary counts every unit, not only the page shown.
    changed = sum(u["overlap"] < 0.5 for u in whole["units"])
    assert f"{changed} of {WIDE_UNITS} units changed" in page.locator(".cv-summary").inner_text()
    # Scrolling to the end of the list loads the next pages, in the same order.
    while len(shown()) < WIDE_UNITS:
        count = len(shown())
        page.locator(".cv-more").scroll_into_view_if_needed()
        page.wait_for_function(f"document.querySelectorAll('.cv-pair').length > {count}")
    assert shown() == expected
    assert page.locator(".cv-more").is_hidden()
    assert len(requests) == WIDE_UNITS // 64
    watched.assert_clean()


def test_stability_view_draws_a_line_per_layer(watched, server, written):
    page = watched.open(server, f"view=stability&run={RUN}")
    page.wait_for_selector(f".cv-stability-body{IDLE}")
    first_chart = page.locator(".cv-chart").first
    assert first_chart.locator(".cv-series").count() == 3
    # By default, overlap with the latest checkpoint: one point per checkpoint and layer.
    assert first_chart.locator(".cv-series circle").count() == 3 * CHECKPOINTS
    rows = page.locator(".cv-table tbody tr")
    assert rows.count() == 3 and "conv1" in rows.first.inner_text()
    screenshot(page, "stability")
    rows.first.locator("button").click()
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert hash_state(page)["view"] == "grid" and hash_state(page)["layer"] == "conv1"
    watched.assert_clean()


def test_deep_link_restores_the_state(watched, server, written):
    step = written.steps[2]
    link = f"view=unit&run={RUN}&layer=conv2&step={step}&unit=5"
    page = watched.open(server, link)
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    for _ in range(2):  # as opened from the link, then after a reload
        assert page.locator(".cv-unit-head h2").inner_text() == "Unit 5"
        assert "conv2" in page.locator(".cv-unit-head").inner_text()
        assert page.locator(".cv-evo-col.cv-selected").get_attribute("data-step") == str(step)
        assert hash_state(page) == {**dict(urllib.parse.parse_qsl(link)), "sort": "unit"}
        page.reload()
        page.wait_for_selector(f".cv-unit-body{IDLE}")
    page.click("text=Layer 2 grid")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert page.locator(".cv-layer-tab[aria-selected='true']").inner_text().startswith("Layer 2")
    assert page.locator(".cv-step-readout").inner_text() == f"step {step}"
    watched.assert_clean()


def test_hostile_names_render_as_text(watched, server):
    page = watched.open(server, urllib.parse.urlencode({"run": HOSTILE_RUN}))
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert HOSTILE_RUN in page.locator(".cv-run-select option").all_inner_texts()
    assert page.locator(".cv-run-select").input_value() == HOSTILE_RUN
    assert page.locator(".cv-tab-name").inner_text() == HOSTILE_LAYER
    assert hash_state(page)["run"] == HOSTILE_RUN and hash_state(page)["layer"] == HOSTILE_LAYER
    assert_images_loaded(page, ".cv-grid .cv-mosaic", 4)
    page.click(".cv-tile[data-unit='0']")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    assert set(page.locator(".cv-hist-label").all_inner_texts()) <= set(HOSTILE_CLASSES)
    alt = page.locator(".cv-unit-current .cv-mosaic").get_attribute("alt")
    assert any(name in alt for name in HOSTILE_CLASSES)
    screenshot(page, "hostile_names")
    # Nothing the names spell became an element, and no script ran (assert_clean: no dialog).
    assert page.locator("img[src='x'], b, svg script, body script").count() == 0
    watched.assert_clean()


def test_backend_errors_are_shown_as_messages(watched, server):
    # The other run was logged with another probe set: the backend refuses with 400 and a reason.
    page = watched.open(server, urllib.parse.urlencode(
        {"view": "compare", "run": RUN, "layer": "conv1", "other_run": NEWER_RUN}))
    alert = page.locator(".cv-notice [role=alert]")
    alert.wait_for()
    assert "probe" in alert.inner_text().lower()
    assert page.locator(".cv-compare-grid").is_hidden()
    screenshot(page, "error")
    assert watched.problems and all("400" in p for p in watched.problems)


def test_data_from_a_newer_version_is_explained_and_the_rest_shown(watched, server):
    page = watched.open(server, f"run={NEWER_RUN}")
    page.wait_for_selector(f".cv-grid{IDLE}")
    banner = page.locator(".cv-banner [role=alert]")
    assert NEWER_RUN in banner.inner_text() and "pip install -U tb-convviz" in banner.inner_text()
    assert page.locator(".cv-layer-tab").all_inner_texts()[0].startswith("Layer 1")
    assert page.locator(".cv-layer-tab").count() == 1
    assert_images_loaded(page, ".cv-grid .cv-mosaic", 4)
    screenshot(page, "newer_version")
    watched.assert_clean()


def test_empty_log_dir_explains_how_to_log(browser, tmp_path):
    with tensorboard_server(str(tmp_path), load_fast=True) as url:
        w = Watched(browser, color_scheme="dark")
        try:
            page = w.open(url)
            message = page.locator(".cv-message")
            message.wait_for()
            lines = message.locator("p").all_inner_texts()
            assert len(lines) == 3
            assert "ConvVizLogger" in lines[1] and "tensorboard" in lines[2].lower()
            # The probe call is whole: copied as it stands, it undoes the normalisation for display
            # (without mean/std, normalised images warn as clipped), and it is the README's call.
            call = message.locator("p").first.locator("code").inner_text()
            parsed = ast.parse(call).body[0].value
            keywords = {k.arg for k in parsed.keywords}
            assert {"mean", "std", "n"} <= keywords
            inspect.signature(ProbeSet.from_dataset).bind(*parsed.args, **dict.fromkeys(keywords))
            readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
            assert call in readme
            screenshot(page, "empty_dark")
            w.assert_clean()
        finally:
            w.context.close()


def test_new_checkpoints_appear_without_reload(browser, tmp_path):
    logdir = tmp_path / "live"
    write_synthetic_run(str(logdir), checkpoints=2, layers=1, units=4, k=4, probe_size=16, image_size=16, seed=5)
    with tensorboard_server(str(tmp_path), load_fast=True) as url:
        w = Watched(browser)
        try:
            page = w.open(url)
            page.wait_for_selector(f".cv-grid{IDLE}")
            assert page.locator(".cv-step-range").inner_text() == "2 / 2"
            page.evaluate("window.__sameDocument = true")
            # Training goes on: the same run, rewritten with two more checkpoints.
            longer = write_synthetic_run(str(logdir), checkpoints=4, layers=1, units=4, k=4, probe_size=16,
                                         image_size=16, seed=5)
            page.wait_for_function("document.querySelector('.cv-step-range').textContent === '4 / 4'",
                                   timeout=90_000)
            assert page.evaluate("window.__sameDocument") is True
            # The page was at the latest checkpoint, so it follows the new latest one.
            page.wait_for_function(f"location.hash.includes('step={longer.steps[-1]}')")
            page.wait_for_selector(f".cv-grid{IDLE}")
            assert_images_loaded(page, ".cv-grid .cv-mosaic", 4)
            w.assert_clean()
        finally:
            w.context.close()


def test_screenshots_of_a_real_run(browser):
    logdir = os.environ.get("CONVVIZ_SCREENSHOT_LOGDIR")
    if not logdir:
        pytest.skip("set CONVVIZ_SCREENSHOT_LOGDIR to a run of `tb-convviz demo` to save the README screenshots")
    with tensorboard_server(logdir, load_fast=True) as url:
        for scheme in ("light", "dark"):
            w = Watched(browser, color_scheme=scheme)
            try:
                page = w.open(url)
                page.wait_for_selector(f".cv-grid{IDLE}", timeout=120_000)
                screenshot(page, "dashboard" if scheme == "light" else "dashboard_dark")
                for view in ("stability", "compare"):
                    page.click(f".cv-nav-item:text-is('{view.capitalize()}')")
                    page.wait_for_selector(f"{'.cv-stability-body' if view == 'stability' else '.cv-compare-grid'}{IDLE}")
                    screenshot(page, f"{view}_{scheme}")
                page.click(".cv-nav-item:text-is('Layers')")
                page.wait_for_selector(f".cv-grid{IDLE}")
                page.locator(".cv-tile").first.click()
                page.wait_for_selector(f".cv-unit-body{IDLE}")
                screenshot(page, f"unit_{scheme}")
                w.assert_clean()
            finally:
                w.context.close()
