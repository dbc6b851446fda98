"""Seeing the patches: zoom, per-patch tooltips and layout geometry, in real Chromium.

The runs are real trainings of the demo net (``trained_runs.py``), whose receptive fields
(7, 27, 51, 67, 83 px) are what made mosaics overflow and deep layers shrink.
"""

from __future__ import annotations


import pytest

from browser_support import IDLE, screenshot
from tb_server import plugin_json

pytestmark = pytest.mark.timeout(300)
LAYERS = [f"features.relu{i}" for i in range(1, 6)]


def box(page, selector: str) -> dict:
    return page.eval_on_selector(selector, "e => { const r = e.getBoundingClientRect();"
                                           " return {left: r.left, top: r.top, right: r.right, bottom: r.bottom}; }")


def test_unit_mosaic_fits_its_frame_on_every_layer(watched, seeds_server):
    boxes, sizes = {}, {}
    for layer in LAYERS:
        page = watched.open(seeds_server, f"view=unit&run=seed0&layer={layer}&unit=1")
        page.wait_for_selector(f".cv-unit-body{IDLE}")
        boxes[layer] = box(page, ".cv-mosaic-frame"), box(page, ".cv-unit-current .cv-mosaic")
        sizes[layer] = page.eval_on_selector(".cv-unit-current .cv-mosaic", "i => [i.naturalWidth, i.width]")
        if layer == LAYERS[1]:
            screenshot(page, "unit_layer2_mosaic")
    overflowing = {layer: (f, m) for layer, (f, m) in boxes.items()
                   if not (f["left"] <= m["left"] and m["right"] <= f["right"] and f["top"] <= m["top"] and m["bottom"] <= f["bottom"])}
    assert not overflowing
    # Each drawn at its own pixel size, filling the 224-px square: nothing rescales it.
    assert all(natural == shown and 218 <= shown <= 224 for natural, shown in sizes.values()), sizes
    watched.assert_clean()


@pytest.mark.parametrize("step", [None, 0])
def test_evolution_strip_shows_the_selected_checkpoint_whole(watched, seeds_server, step):
    watched.page.set_viewport_size({"width": 640, "height": 800})  # narrower than the 9 checkpoints
    where = "" if step is None else f"&step={step}"
    page = watched.open(seeds_server, f"view=unit&run=seed0&layer=features.relu2&unit=2{where}")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    strip = page.locator(".cv-evo-strip")
    assert strip.evaluate("s => s.scrollWidth > s.clientWidth")  # it does scroll
    frame, selected = box(page, ".cv-evo-strip"), box(page, ".cv-evo-col.cv-selected")
    assert frame["left"] <= selected["left"] and selected["right"] <= frame["right"], (frame, selected)
    # Scrolled to either end, the first and the last column are whole.
    for end, column in (("0", "first"), ("1e6", "last")):
        strip.evaluate(f"s => {{ s.scrollLeft = {end}; }}")
        col = page.eval_on_selector(f".cv-evo-col:{column}-child", "e => { const r = e.getBoundingClientRect(); return [r.left, r.right]; }")
        assert frame["left"] <= col[0] and col[1] <= frame["right"], (column, frame, col)
    screenshot(page, f"strip_{'latest' if step is None else 'first'}")
    watched.assert_clean()


def test_deep_layers_are_drawn_as_large_as_shallow_ones(watched, seeds_server):
    sizes = {}
    for layer in (LAYERS[0], LAYERS[4]):
        page = watched.open(seeds_server, f"run=seed0&layer={layer}")
        page.wait_for_selector(f".cv-grid{IDLE}")
        sizes[layer] = page.eval_on_selector(".cv-tile[data-unit='0'] .cv-mosaic", "i => [i.width, i.height, i.naturalWidth]")
        assert "size=48" in page.eval_on_selector(".cv-tile[data-unit='0'] .cv-mosaic", "i => i.currentSrc")
    assert sizes[LAYERS[0]] == sizes[LAYERS[4]] == [3 * 48 + 2] * 3
    # The user picks larger patches: every tile follows.
    page.select_option("[aria-label='Patch size']", "96")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert page.eval_on_selector(".cv-tile[data-unit='0'] .cv-mosaic", "i => [i.width, i.naturalWidth]") == [290, 290]
    screenshot(page, "grid_layer5_96px")
    watched.assert_clean()


def test_zoom_opens_a_units_patches_large_with_tooltips(watched, seeds_server):
    layer = LAYERS[2]
    unit = plugin_json(seeds_server, "topk", run="seed0", layer=layer)["units"][3]
    page = watched.open(seeds_server, f"run=seed0&layer={layer}")
    page.wait_for_selector(f".cv-grid{IDLE}")
    # Per-patch tooltips in the grid itself: one cell over each patch.
    tips = page.locator(".cv-tile[data-unit='3'] .cv-cell").evaluate_all("els => els.map(e => e.title)")
    assert len(tips) == 9
    for record, tip in zip(unit["records"], tips):
        assert f"Probe image #{record['image']}" in tip and f"label {record['label_name']}" in tip
        assert f"activation {record['value']:.3f}" in tip
    page.hover(".cv-tile[data-unit='3']")
    page.keyboard.press("z")
    dialog = page.locator("dialog.cv-zoom")
    dialog.wait_for()
    page.wait_for_function("[...document.querySelectorAll('.cv-zoom img')].every(i => i.complete && i.naturalWidth)")
    assert "Unit 3" in dialog.locator(".cv-dialog-head").inner_text()
    widths = dialog.locator("img").evaluate_all("els => els.map(e => e.naturalWidth)")
    assert widths == [128] * 9
    titles = dialog.locator(".cv-zoom-open").evaluate_all("els => els.map(e => e.title)")
    assert all(f"#{r['image']}" in t and r["label_name"] in t for r, t in zip(unit["records"], titles))
    screenshot(page, "zoom_128")
    dialog.locator("[aria-label='Patch size']").select_option("256")
    page.wait_for_function("[...document.querySelectorAll('.cv-zoom img')].every(i => i.complete && i.naturalWidth === 256)")
    page.keyboard.press("-")
    page.wait_for_function("[...document.querySelectorAll('.cv-zoom img')].every(i => i.complete && i.naturalWidth === 192)")
    page.keyboard.press("Escape")
    dialog.wait_for(state="detached")
    # The unit view's mosaic zooms on a click, at the size chosen last.
    page.click(".cv-tile[data-unit='3']")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    page.click(".cv-mosaic-frame")
    dialog.wait_for()
    page.wait_for_function("[...document.querySelectorAll('.cv-zoom img')].every(i => i.complete && i.naturalWidth === 192)")
    screenshot(page, "zoom_unit_192")
    page.keyboard.press("Escape")
    watched.assert_clean()


def test_a_high_density_screen_gets_patches_at_its_own_resolution(browser, seeds_server):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=2)
    try:
        page = context.new_page()
        page.goto(f"{seeds_server}data/plugin_entry.html?name=convviz#run=seed0&layer={LAYERS[4]}")
        page.wait_for_selector(f".cv-grid{IDLE}")
        shown, natural = page.eval_on_selector(
            ".cv-tile[data-unit='0'] .cv-mosaic", "i => [i.getBoundingClientRect().width, i.naturalWidth]")
        assert (shown, natural) == (3 * 48 + 2, 3 * 96 + 2)  # same layout, twice the pixels
        page.hover(".cv-tile[data-unit='0']")
        page.keyboard.press("z")
        page.wait_for_function("[...document.querySelectorAll('.cv-zoom img')].every(i => i.complete && i.naturalWidth)")
        sizes = page.eval_on_selector_all(".cv-zoom img", "els => els.map(i => [i.getBoundingClientRect().width, i.naturalWidth])")
        assert sizes == [[128, 256]] * 9
    finally:
        context.close()


@pytest.mark.parametrize("how", ["pasted link", "back", "new hash"])
def test_an_address_change_closes_the_old_views_dialogs(watched, seeds_server, how):
    first = f"run=seed0&layer={LAYERS[0]}"
    page = watched.open(seeds_server, first)
    page.wait_for_selector(f".cv-grid{IDLE}")
    page.evaluate(f"location.hash = 'run=seed0&layer={LAYERS[4]}'")  # a history entry to go back from
    page.wait_for_selector(".cv-layer-tab[aria-selected='true']:has-text('Layer 5')")
    page.wait_for_selector(f".cv-grid{IDLE}")
    page.hover(".cv-tile[data-unit='0']")
    page.keyboard.press("z")
    page.locator("dialog.cv-zoom").wait_for()
    assert "Unit 0 · Layer 5" in page.locator("dialog.cv-zoom .cv-dialog-head").inner_text()
    if how == "pasted link":
        page.goto(f"{seeds_server}data/plugin_entry.html?name=convviz#view=stability&run=seed0")
        page.wait_for_selector(f".cv-stability-body{IDLE}")
    elif how == "back":
        page.go_back()
        page.wait_for_selector(".cv-layer-tab[aria-selected='true']:has-text('Layer 1')")
    else:
        page.evaluate("location.hash = 'view=unit&run=seed0&layer=features.relu2&unit=1'")
        page.wait_for_selector(f".cv-unit-body{IDLE}")
    page.locator("dialog").wait_for(state="detached")
    assert page.locator("dialog").count() == 0
    watched.assert_clean()
