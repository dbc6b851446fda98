"""The projection toggle, the Fig. 4 grid and the layer-1 filters in headless Chromium, against a real TensorBoard.

Screenshots go to ``tests/artifacts`` (or ``$CONVVIZ_SCREENSHOT_DIR``); with
``CONVVIZ_SCREENSHOT_LOGDIR`` set to a ``tb-convviz demo`` log dir,
``test_screenshots_of_a_real_run`` saves the README's pictures of these views from it (and of a
stream view, when the run logged streams).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from browser_support import IDLE, Watched, hash_state, screenshot
from tb_convviz import ConvVizLogger, ProbeSet
from tb_convviz.demo.model import DemoAlexNet
from tb_convviz.synthetic_run import write_synthetic_run
from tb_server import get, plugin_json, tensorboard_server, wait_for

STEPS = [0, 2, 5, 9, 14, 20]
LAYER1 = "features.relu1"
LAYER3 = "features.relu3"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser_figures")
    torch.manual_seed(0)
    model = DemoAlexNet(width=8)
    probe = ProbeSet(torch.rand(32, 3, 64, 64), labels=torch.arange(32) % 4, class_names=list("abcd"))
    with ConvVizLogger(model, probe, root / "new", layers=[LAYER1, "features.relu2", LAYER3], k=4, batch_size=32, steps=STEPS,
                       projections_topk_every="last") as logger:
        for step in STEPS:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.2 * torch.randn_like(p) * p.std())
                model.features.conv1.weight[2] *= 2
            assert logger.log(step)
    write_synthetic_run(str(root / "old"), checkpoints=3, units=8, k=4, probe_size=32)
    with tensorboard_server(str(root), load_fast=True) as url:
        def loaded():
            status, _, body = get(url + "data/plugin/convviz/runs")
            runs = {r["run"]: r for r in json.loads(body)["runs"]} if status == 200 else {}
            return len(runs) == 2 and runs["new"]["filters"] and all(
                (layer["projections"] or {}).get("steps") == STEPS for layer in runs["new"]["layers"])

        wait_for(loaded)
        yield url


def loaded_images(page, selector: str) -> list[dict]:
    return page.eval_on_selector_all(selector, "els => els.map(e => ({src: e.currentSrc, w: e.naturalWidth}))")


def test_grid_toggles_patches_projections_and_both(watched, server):
    page = watched.open(server, f"run=new&layer={LAYER3}&view=grid")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert all("/mosaic?" in i["src"] for i in loaded_images(page, ".cv-grid .cv-mosaic"))
    page.click(".cv-show[data-show='projection']")
    page.wait_for_function("location.hash.includes('show=projection')")
    page.wait_for_selector(f".cv-grid{IDLE}")
    images = loaded_images(page, ".cv-grid .cv-mosaic")
    assert len(images) == 24 and all("/projection_mosaic?" in i["src"] and i["w"] > 0 for i in images)
    page.click(".cv-show[data-show='both']")
    page.wait_for_function("location.hash.includes('show=both')")
    page.wait_for_selector(f".cv-grid{IDLE}")
    images = loaded_images(page, ".cv-grid .cv-mosaic")
    assert len(images) == 48 and all(i["w"] > 0 for i in images)
    assert sum("/projection_mosaic?" in i["src"] for i in images) == 24
    screenshot(page, "figures_grid_both")
    page.reload()  # the choice is in the URL
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert page.get_attribute(".cv-show[data-show='both']", "aria-pressed") == "true"
    watched.assert_clean()


def test_unit_and_compare_views_show_projections(watched, server):
    page = watched.open(server, f"run=new&layer={LAYER1}&view=unit&unit=2&show=both&step={STEPS[-1]}")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    strip = loaded_images(page, ".cv-evo-strip img")
    assert len(strip) == 2 * len(STEPS) and all(i["w"] > 0 for i in strip)
    assert sum("/projection?" in i["src"] for i in strip) == len(STEPS)
    assert len(loaded_images(page, ".cv-unit-current img.cv-projection")) == 1
    page.click("button[aria-pressed='false']:has-text('Show top-4')")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    # All k were projected at the last step only: the other ranks say so instead of a broken image.
    assert len(loaded_images(page, ".cv-evo-strip img.cv-projection")) == len(STEPS) + 3
    assert page.locator(".cv-evo-strip .cv-no-projection").count() == 3 * (len(STEPS) - 1)
    screenshot(page, "figures_unit_both")
    page = watched.open(server, f"run=new&layer={LAYER3}&view=compare&show=projection&step={STEPS[-1]}&other_step=0")
    page.wait_for_selector(f".cv-compare-grid{IDLE}")
    images = loaded_images(page, ".cv-compare-grid .cv-mosaic")
    assert images and all("/projection_mosaic?" in i["src"] and i["w"] > 0 for i in images)
    watched.assert_clean()


def test_fig4_grid_loads_one_request_per_row_and_opens_the_unit(watched, server):
    requests = []
    watched.page.on("request", lambda r: requests.append(r.url))
    page = watched.open(server, f"run=new&layer={LAYER3}&view=evolution&count=8")
    page.wait_for_selector(f".cv-fig4{IDLE}")
    rows = loaded_images(page, ".cv-fig4-img")
    assert len(rows) == 8 and all(i["w"] > 0 for i in rows)
    assert sum("/row?" in u for u in requests) == 8
    assert page.locator(".cv-fig4-step").count() == len(STEPS)
    screenshot(page, "figures_fig4")
    # Thin the columns to an explicit list, as the paper's epochs 1, 2, 5, ...
    page.fill(".cv-steps-input", "0,5,20")
    page.press(".cv-steps-input", "Enter")
    page.wait_for_function("location.hash.includes('cols=0%2C5%2C20')")
    page.wait_for_selector(f".cv-fig4{IDLE}")
    assert page.locator(".cv-fig4-step").all_inner_texts() == ["0", "5", "20"]
    # Random rows are reproducible by seed.
    page.select_option("select[aria-label='Rows']", "random")
    page.wait_for_selector(f".cv-fig4{IDLE}")
    first = page.eval_on_selector_all(".cv-fig4-unit", "els => els.map(e => e.dataset.unit)")
    page.reload()
    page.wait_for_selector(f".cv-fig4{IDLE}")
    assert page.eval_on_selector_all(".cv-fig4-unit", "els => els.map(e => e.dataset.unit)") == first
    # A click on the middle column's cell opens that unit at step 5.
    img = page.locator(".cv-fig4-img").first
    unit = int(first[0])
    box = img.bounding_box()
    img.click(position={"x": box["width"] / 2, "y": box["height"] / 2})
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    state = hash_state(page)
    assert (state["view"], state["unit"], state["step"]) == ("unit", str(unit), "5")
    watched.assert_clean()


def test_layer1_filters_with_slider_and_flags(watched, server):
    page = watched.open(server, f"run=new&layer={LAYER1}&view=grid")
    page.wait_for_selector(f".cv-grid{IDLE}")
    page.click(".cv-filters-toggle")
    page.wait_for_selector(f".cv-filters{IDLE}")
    assert hash_state(page)["filters"] == "1"
    assert page.eval_on_selector(".cv-filter-mosaic", "e => e.naturalWidth") > 0
    assert "#2" in page.inner_text(".cv-dominant")
    screenshot(page, "figures_filters")
    before = page.eval_on_selector(".cv-filter-mosaic", "e => e.currentSrc")
    page.focus(".cv-filters input[type=range]")
    page.keyboard.press("Home")
    page.wait_for_function("location.hash.includes('filter_step=0')")
    page.wait_for_selector(f".cv-filters{IDLE}")
    assert page.eval_on_selector(".cv-filter-mosaic", "e => e.currentSrc") != before
    # Not offered on deeper layers.
    page.click(".cv-layer-tab:nth-child(3)")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert page.locator(".cv-filters-toggle").count() == 0
    watched.assert_clean()


def test_layer1_filters_follow_the_patch_size_and_zoom(watched, server):
    count = plugin_json(server, "filters", run="new")["shape"][0]
    cols = math.ceil(math.sqrt(count))
    page = watched.open(server, f"run=new&layer={LAYER1}&filters=1")
    page.wait_for_selector(f".cv-filters{IDLE}")

    def shows(selector: str, tile: int, css: int) -> None:
        """`selector`'s filter mosaic has `tile`-px tiles (1-px separators) and is drawn at `css` px per tile."""
        natural = cols * (tile + 1) - 1
        width = round(natural * css / tile)
        page.wait_for_function(
            """([selector, tile, natural, width]) => { const i = document.querySelector(selector);
               return i && i.complete && new URL(i.currentSrc).searchParams.get("size") === String(tile)
                 && i.naturalWidth === natural && i.getBoundingClientRect().width === width; }""",
            arg=[selector, tile, natural, width])

    grid = ".cv-filters .cv-filter-mosaic"
    shows(grid, 48, 48)  # as large as the grid's patches (48 px by default)
    page.select_option(".cv-toolbar [aria-label='Patch size']", "96")
    page.wait_for_function("location.hash.includes('patch=96')")
    shows(grid, 96, 96)
    # Zoom: a click on the filters opens them large; the dialog's size scales the largest tile (128 px) up.
    page.click(".cv-filter-open")
    dialog = page.locator("dialog.cv-zoom")
    dialog.wait_for()
    assert "First-layer filters" in dialog.locator(".cv-dialog-head").inner_text()
    zoomed = "dialog.cv-zoom .cv-filter-mosaic"
    shows(zoomed, 128, 128)
    dialog.locator("[aria-label='Patch size']").select_option("256")
    shows(zoomed, 128, 256)
    page.keyboard.press("-")
    shows(zoomed, 128, 192)
    page.keyboard.press("Escape")
    dialog.wait_for(state="detached")
    # z over the filters opens them too, at the size chosen last.
    page.hover(".cv-filter-open")
    page.keyboard.press("z")
    dialog.wait_for()
    shows(zoomed, 128, 192)
    screenshot(page, "filters_zoom")
    page.keyboard.press("Escape")
    watched.assert_clean()


def test_an_older_run_says_not_logged(watched, server):
    page = watched.open(server, "run=old&view=grid&show=projection")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert "not logged in this run" in page.inner_text(".cv-show-missing")
    assert page.is_disabled(".cv-show[data-show='projection']")
    assert all("/mosaic?" in i["src"] and i["w"] > 0 for i in loaded_images(page, ".cv-grid .cv-mosaic"))
    assert "not logged in this run" in page.inner_text(".cv-filters-toggle")
    assert page.is_disabled(".cv-filters-toggle")
    page = watched.open(server, "run=old&view=evolution&show=projection")
    page.wait_for_selector(f".cv-fig4{IDLE}")
    assert "not logged in this run" in page.inner_text(".cv-notice")
    assert all("kind=patch" in i["src"] and i["w"] > 0 for i in loaded_images(page, ".cv-fig4-img"))
    screenshot(page, "figures_old_run")
    watched.assert_clean()


def test_screenshots_of_a_real_run(browser):
    logdir = os.environ.get("CONVVIZ_SCREENSHOT_LOGDIR")
    if not logdir:
        pytest.skip("set CONVVIZ_SCREENSHOT_LOGDIR to a run of `tb-convviz demo` to save the README screenshots")
    with tensorboard_server(logdir, load_fast=True) as url:
        wait_for(lambda: get(url + "data/plugin/convviz/runs")[0] == 200)
        runs = json.loads(get(url + "data/plugin/convviz/runs")[2])["runs"]
        run = runs[0]
        layers = [layer["name"] for layer in run["layers"]]
        w = Watched(browser)
        try:
            page = w.open(url, f"run={run['run']}&layer={layers[1]}&view=grid&show=both")
            page.wait_for_selector(f".cv-grid{IDLE}", timeout=120000)
            screenshot(page, "real_projections_both")
            page = w.open(url, f"run={run['run']}&layer={layers[2]}&view=evolution&count=16&show=projection")
            page.wait_for_selector(f".cv-fig4{IDLE}", timeout=120000)
            screenshot(page, "real_fig4")
            page = w.open(url, f"run={run['run']}&layer={layers[0]}&view=grid&filters=1")
            page.wait_for_selector(f".cv-filters{IDLE}", timeout=120000)
            screenshot(page, "real_filters")
            if run["streams"]:
                # A unit's top-9 over the training images beside the probe set's (the README's Streams).
                page = w.open(url, f"run={run['run']}&layer={layers[1]}&view=unit&unit=3&source=train&beside=probe")
                page.wait_for_selector(f".cv-unit-body{IDLE}", timeout=120000)
                screenshot(page, "real_unit_streams")
            w.assert_clean()
        finally:
            w.context.close()
