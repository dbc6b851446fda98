"""Effective-field crops in real Chromium: the Crops switch, "Where it fires", the Stability curve, older runs.

The runs are real trainings of the demo net (``trained_runs.py``), which log effective fields
and top-1 projections at every checkpoint; the older run is a synthetic one without them.
"""

from __future__ import annotations

import json
import urllib.parse

import pytest

from browser_support import IDLE, hash_state, mosaic_sources, screenshot
from tb_convviz.synthetic_run import write_synthetic_run
from tb_server import get, tensorboard_server, wait_for

pytestmark = pytest.mark.timeout(300)
LAYER5 = "features.relu5"


def field_of(url: str) -> str | None:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)).get("field")


def test_crops_switch_between_effective_and_theoretical_fields(watched, seeds_server):
    page = watched.open(seeds_server, f"run=seed0&layer={LAYER5}")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert "% of the input-gradient mass" in page.inner_text(".cv-field-bar")
    effective = mosaic_sources(page)
    assert effective and all(field_of(src) is None for src in effective)  # the server's default: effective
    screenshot(page, "crops_effective_layer5")
    page.click(".cv-field-switch [data-field='theoretical']")
    page.wait_for_function("[...document.querySelectorAll('.cv-grid .cv-mosaic')].length > 0 && "
                           "[...document.querySelectorAll('.cv-grid .cv-mosaic')].every(i => i.currentSrc.includes('field=theoretical'))")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert hash_state(page)["field"] == "theoretical"
    assert page.get_attribute(".cv-field-switch [data-field='theoretical']", "aria-checked") == "true"
    screenshot(page, "crops_theoretical_layer5")
    # The switch is in the URL: a fresh page opened at that address crops the same way.
    again = watched.open(seeds_server, f"run=seed0&layer={LAYER5}&field=theoretical")
    again.wait_for_selector(f".cv-grid{IDLE}")
    assert all(field_of(src) == "theoretical" for src in mosaic_sources(again))
    again.click(".cv-field-switch [data-field='effective']")
    again.wait_for_function("[...document.querySelectorAll('.cv-grid .cv-mosaic')].length > 0 && "
                            "[...document.querySelectorAll('.cv-grid .cv-mosaic')].every(i => !i.currentSrc.includes('field='))")
    assert "field" not in hash_state(again)
    watched.assert_clean()


def test_where_it_fires_on_the_zoomed_patch_and_the_whole_image(watched, seeds_server):
    page = watched.open(seeds_server, f"run=seed0&layer={LAYER5}")
    page.wait_for_selector(f".cv-grid{IDLE}")
    page.hover(".cv-tile[data-unit='2']")
    page.keyboard.press("z")
    dialog = page.locator("dialog.cv-zoom")
    dialog.wait_for()
    page.wait_for_function("[...document.querySelectorAll('.cv-zoom img')].every(i => i.complete && i.naturalWidth)")
    before = dialog.locator("img").evaluate_all("els => els.map(e => e.currentSrc)")
    assert not any("overlay=" in src for src in before)
    dialog.locator(".cv-fires").check()
    page.wait_for_function("document.querySelector('.cv-zoom img').currentSrc.includes('overlay=projection') && "
                           "[...document.querySelectorAll('.cv-zoom img')].every(i => i.complete && i.naturalWidth)")
    after = dialog.locator("img").evaluate_all("els => els.map(e => e.currentSrc)")
    # Only the top-1 record is projected at these checkpoints: the others stay plain.
    assert "overlay=projection" in after[0] and not any("overlay=" in src for src in after[1:])
    screenshot(page, "zoom_where_it_fires")
    dialog.locator(".cv-zoom-open").first.click()
    probe = page.locator("dialog:not(.cv-zoom)")
    probe.wait_for()
    page.wait_for_function("document.querySelector('.cv-probe-image').complete && "
                           "document.querySelector('.cv-probe-image').naturalWidth > 0")
    assert "Blue: the effective field" in probe.inner_text()
    probe.locator(".cv-fires").check()
    page.wait_for_function("document.querySelector('.cv-probe-image').currentSrc.includes('overlay=projection') && "
                           "document.querySelector('.cv-probe-image').complete && "
                           "document.querySelector('.cv-probe-image').naturalWidth > 0")
    screenshot(page, "probe_image_where_it_fires")
    watched.assert_clean()


def test_stability_view_draws_the_effective_field_over_training(watched, seeds_server):
    page = watched.open(seeds_server, "view=stability&run=seed0")
    page.wait_for_selector(f".cv-stability-body{IDLE}")
    card = page.locator(".cv-field-card")
    assert "Effective receptive field" in card.inner_text()
    assert card.locator("svg .cv-line, svg path, svg polyline").count() >= 5  # one line per conv layer
    screenshot(page, "stability_effective_field")
    watched.assert_clean()


@pytest.fixture(scope="module")
def old_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("old_erf")
    write_synthetic_run(str(root / "old"), checkpoints=2, units=4, k=4, probe_size=16)
    with tensorboard_server(str(root), load_fast=True) as url:
        wait_for(lambda: get(url + "data/plugin/convviz/runs")[0] == 200
                 and json.loads(get(url + "data/plugin/convviz/runs")[2])["runs"])
        yield url


def test_an_older_run_opens_with_theoretical_crops_and_says_so(watched, old_server):
    page = watched.open(old_server, "run=old")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert "no effective receptive fields" in page.inner_text(".cv-field-missing")
    assert page.locator(".cv-field-switch").count() == 0
    assert all(field_of(src) is None for src in mosaic_sources(page))
    page.click("button.cv-nav-item:has-text('Stability')")
    page.wait_for_selector(f".cv-stability-body{IDLE}")
    assert page.locator(".cv-field-card").count() == 0
    watched.assert_clean()


def test_both_view_draws_a_top1_projection_as_large_as_the_patch_mosaic(watched, seeds_server):
    page = watched.open(seeds_server, f"run=seed0&layer={LAYER5}&show=both")
    page.wait_for_selector(f".cv-grid{IDLE}")
    page.wait_for_function("(() => { const i = document.querySelector('.cv-tile[data-unit=\"1\"] img.cv-projection');"
                           " return i && i.complete && i.naturalWidth > 0; })()")
    sizes = page.eval_on_selector_all(
        ".cv-tile[data-unit='1'] img.cv-mosaic",
        "els => els.map(e => { const r = e.getBoundingClientRect(); "
        "return [e.classList.contains('cv-projection'), Math.round(r.width), Math.round(r.height), e.naturalWidth]; })")
    patches = [s for s in sizes if not s[0]]
    projection = [s for s in sizes if s[0]]
    assert len(patches) == len(projection) == 1
    # The top-1 projection fills the patches' 3x3 box (146 px at 48-px patches), at its own pixel size.
    assert projection[0][1:3] == patches[0][1:3] == [3 * 48 + 2] * 2 and projection[0][3] == 3 * 48 + 2
    screenshot(page, "both_top1_projection_as_large_as_mosaic")
    watched.assert_clean()
