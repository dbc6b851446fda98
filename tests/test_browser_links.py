"""Shared links, TensorBoard's theme, keys and finding units, in real Chromium inside real TensorBoard."""

from __future__ import annotations

import urllib.parse

import pytest

from browser_support import IDLE, Watched, hash_state, screenshot
from tb_server import plugin_json

pytestmark = pytest.mark.timeout(300)
LAYER3 = "features.relu3"


def tab_frame(page, url: str):
    page.goto(url)
    return page.wait_for_selector("iframe", timeout=60_000).content_frame()


def parent_state(page) -> dict[str, str]:
    """The cv.* components of TensorBoard's own address."""
    fragment = urllib.parse.urlsplit(page.url).fragment
    return {k[3:]: v for k, v in urllib.parse.parse_qsl(fragment) if k.startswith("cv.")}


def test_a_copied_address_opens_the_same_view_in_a_fresh_browser(browser, seeds_server):
    first = Watched(browser)
    try:
        first.context.grant_permissions(["clipboard-read", "clipboard-write"])
        page = first.page
        frame = tab_frame(page, seeds_server + "#convviz")
        frame.wait_for_selector(f".cv-grid{IDLE}")
        frame.select_option(".cv-run-select", "seed1")
        frame.wait_for_selector(f".cv-grid{IDLE}")
        frame.click(".cv-summary")  # as a user clicks into the tab before typing (not into the <select>)
        page.keyboard.press("3")
        frame.wait_for_function(f"location.hash.includes('layer={LAYER3}')")
        frame.wait_for_selector(f".cv-grid{IDLE}")
        page.keyboard.press("ArrowLeft")
        frame.wait_for_function("location.hash.includes('step=7')")
        jump = frame.locator(".cv-unit-jump")
        jump.fill("5")
        jump.press("Enter")
        frame.wait_for_selector(f".cv-unit-body{IDLE}")
        expected = {"view": "unit", "run": "seed1", "layer": LAYER3, "step": "7", "unit": "5", "sort": "unit"}
        assert hash_state(frame) == expected
        # The state is in TensorBoard's address bar, where a copied address carries it.
        page.wait_for_function("location.hash.includes('cv.unit=5')")
        assert urllib.parse.urlsplit(page.url).fragment.split("&")[0] == "convviz"
        assert parent_state(page) == expected
        frame.click(".cv-copy-link")
        frame.wait_for_function("document.querySelector('.cv-live').textContent === 'Link copied'")
        link = page.evaluate("navigator.clipboard.readText()")
        assert link == page.url
        first.assert_clean(frame)
    finally:
        first.context.close()

    fresh = Watched(browser)  # a new context: no localStorage, no history
    try:
        frame = tab_frame(fresh.page, link)
        frame.wait_for_selector(f".cv-unit-body{IDLE}")
        assert frame.locator(".cv-unit-head h2").inner_text() == "Unit 5"
        assert "Layer 3" in frame.locator(".cv-unit-head").inner_text()
        assert frame.locator(".cv-run-select").input_value() == "seed1"
        assert frame.locator(".cv-evo-col.cv-selected").get_attribute("data-step") == "7"
        # TensorBoard keeps the extra hash components and shows the ConvViz tab.
        assert parent_state(fresh.page) == expected
        screenshot(fresh.page, "shared_link")
        fresh.assert_clean(frame)
    finally:
        fresh.context.close()


@pytest.mark.parametrize("setting, system, shown", [
    ("dark", "light", "dark"), ("light", "dark", "light"), ("browser_default", "dark", "dark"),
])
def test_the_tab_follows_tensorboards_theme_setting(browser, seeds_server, setting, system, shown):
    w = Watched(browser, color_scheme=system)
    try:
        # TensorBoard's own settings record, as its settings menu writes it.
        w.context.add_init_script(
            f"localStorage.setItem('_tb_global_settings', JSON.stringify({{theme: '{setting}'}}))")
        frame = tab_frame(w.page, seeds_server + "#convviz")
        frame.wait_for_selector(f".cv-grid{IDLE}")
        assert w.page.evaluate("document.body.classList.contains('dark-mode')") == (shown == "dark")
        background = frame.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == ("rgb(18, 20, 24)" if shown == "dark" else "rgb(246, 247, 249)")
        screenshot(w.page, f"theme_{setting}_on_{system}")
        # Switching TensorBoard's theme while the tab is open follows at once.
        w.page.evaluate("document.body.classList.toggle('dark-mode')")
        flipped = "rgb(246, 247, 249)" if shown == "dark" else "rgb(18, 20, 24)"
        frame.wait_for_function(f"getComputedStyle(document.body).backgroundColor === '{flipped}'")
        w.assert_clean(frame)
    finally:
        w.context.close()


def test_keys_move_through_layers_checkpoints_and_units_and_help_lists_them(watched, seeds_server):
    page = watched.open(seeds_server, "run=seed0")
    page.wait_for_selector(f".cv-grid{IDLE}")
    page.keyboard.press("2")
    page.wait_for_function("location.hash.includes('layer=features.relu2')")
    assert page.locator(".cv-layer-tab[aria-selected='true']").inner_text().startswith("Layer 2")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("location.hash.includes('step=7')")
    page.keyboard.press("?")
    help_ = page.locator("dialog.cv-help")
    help_.wait_for()
    keys = help_.locator("kbd").all_inner_texts()
    assert {"1 – 5", "← →", "↑ ↓", "g", "z", "?"} <= set(keys)
    screenshot(page, "help")
    page.keyboard.press("Escape")
    help_.wait_for(state="detached")
    page.keyboard.press("g")
    assert page.evaluate("document.activeElement.classList.contains('cv-unit-jump')")
    page.keyboard.type("4")
    page.keyboard.press("Enter")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    assert hash_state(page)["unit"] == "4"
    page.locator("body").press("ArrowDown")
    page.wait_for_function("location.hash.includes('unit=5')")
    page.locator("body").press("ArrowUp")
    page.locator("body").press("ArrowUp")
    page.wait_for_function("location.hash.includes('unit=3')")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    assert page.locator(".cv-unit-head h2").inner_text() == "Unit 3"
    watched.assert_clean()


def test_filters_show_dead_changed_and_class_units(watched, seeds_server):
    data = plugin_json(seeds_server, "topk", run="seed0", layer="features.relu2")
    page = watched.open(seeds_server, "run=seed0&layer=features.relu2")
    page.wait_for_selector(f".cv-grid{IDLE}")

    def shown():
        return sorted(int(u) for u in page.eval_on_selector_all(
            ".cv-grid .cv-tile:not([hidden])", "els => els.map(e => e.dataset.unit)"))

    assert shown() == list(range(len(data["units"])))
    labels = sorted({r["label"] for u in data["units"] for r in u["records"]})
    assert len(labels) > 1
    options = page.locator("[aria-label='Filter units'] option").evaluate_all("els => els.map(e => e.value)")
    assert options == ["", "dead", "changed", *[f"class:{label}" for label in labels]]
    for value, expected in [
        ("dead", [u["unit"] for u in data["units"] if u["dead"]]),
        ("changed", [u["unit"] for u in data["units"] if u["overlap"] is not None and u["overlap"] < 0.5]),
        (f"class:{labels[0]}", [u["unit"] for u in data["units"] if any(r["label"] == labels[0] for r in u["records"])]),
    ]:
        page.select_option("[aria-label='Filter units']", value)
        page.wait_for_function(f"location.hash.includes('filter={urllib.parse.quote(value)}')")
        page.wait_for_selector(f".cv-grid{IDLE}", state="attached")  # all tiles may be hidden
        assert shown() == expected, value
        assert page.locator(".cv-notice .cv-message").count() == (not expected)
        assert f"{len(expected)} of {len(data['units'])} units shown" in page.locator(".cv-summary").inner_text()
    screenshot(page, "filter_class")
    # In a unit, ↓ and ↑ step through the units the filter shows, in the grid's order:
    # with the rarest class, the next unit shown is not the next unit number.
    by_label = {label: [u["unit"] for u in data["units"] if any(r["label"] == label for r in u["records"])]
                for label in labels}
    rare = min(labels, key=lambda label: len(by_label[label]))
    passing = by_label[rare]
    assert len(passing) >= 2 and passing[1] != passing[0] + 1
    page.select_option("[aria-label='Filter units']", f"class:{rare}")
    page.wait_for_selector(f".cv-tile[data-unit='{passing[0]}']:not([hidden])")
    page.click(f".cv-tile[data-unit='{passing[0]}']")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    page.locator("body").press("ArrowDown")
    page.wait_for_function(f"location.hash.includes('unit={passing[1]}&')")
    page.locator("body").press("ArrowUp")
    page.wait_for_function(f"location.hash.includes('unit={passing[0]}&')")
    watched.assert_clean()


def test_stability_shows_overlap_with_the_latest_checkpoint_by_default(watched, seeds_server):
    stats = plugin_json(seeds_server, "stats", run="seed0")
    page = watched.open(seeds_server, "view=stability&run=seed0")
    page.wait_for_selector(f".cv-stability-body{IDLE}")
    chart = page.locator(".cv-chart").first
    steps = len(stats["layers"][0]["steps"])
    # One point per checkpoint and layer, the last at 100%.
    assert chart.locator(".cv-series circle").count() == 5 * steps
    assert "latest checkpoint" in page.locator(".cv-cards .cv-card-wide .cv-caption").inner_text()
    tips = chart.locator(".cv-series").first.locator("circle title").evaluate_all("els => els.map(e => e.textContent)")
    expected = [round(100 * v) for v in stats["layers"][0]["final_overlap"]]
    assert [int(t.rsplit(" ", 1)[1].rstrip("%")) for t in tips] == expected
    screenshot(page, "stability_final")
    page.click("[role=radio]:text-is('Previous checkpoint')")
    page.wait_for_function("location.hash.includes('against=previous')")
    page.wait_for_function("document.querySelector('.cv-cards .cv-card-wide .cv-caption').textContent.includes('schedule')")
    page.wait_for_selector(f".cv-stability-body{IDLE}")
    # The first checkpoint has no previous one: one point fewer per layer.
    assert page.locator(".cv-chart").first.locator(".cv-series circle").count() == 5 * (steps - 1)
    watched.assert_clean()


def test_typing_a_unit_survives_a_checkpoint_change(watched, seeds_server):
    page = watched.open(seeds_server, "run=seed0")
    page.wait_for_selector(f".cv-grid{IDLE}")
    page.keyboard.press("g")
    page.keyboard.type("1")
    steps = plugin_json(seeds_server, "runs")["runs"][0]["layers"][0]["steps"]
    # A new checkpoint's data arrives while the user is typing.
    page.evaluate("(step) => { const p = new URLSearchParams(location.hash.slice(1)); p.set('step', step);"
                  " location.hash = p.toString(); }", steps[1])
    page.wait_for_function(f"location.hash.includes('step={steps[1]}')")
    page.wait_for_selector(f".cv-grid{IDLE}")
    assert page.evaluate("document.activeElement.classList.contains('cv-unit-jump')")
    assert page.locator(".cv-unit-jump").input_value() == "1"
    page.keyboard.press("Enter")
    page.wait_for_selector(f".cv-unit-body{IDLE}")
    assert hash_state(page)["unit"] == "1" and hash_state(page)["step"] == str(steps[1])
    watched.assert_clean(page)


def settled_since(steps: list[int], overlap: list[float | None]) -> int | None:
    """Brute force: the earliest step from which every value up to the latest is >= 0.8, the latest alone not counting."""
    for i, step in enumerate(steps[:-1]):
        if all(v is not None and v >= 0.8 for v in overlap[i:]):
            return step
    return None


@pytest.mark.parametrize("against, key, name", [
    (None, "final_overlap", "latest checkpoint"), ("previous", "topk_overlap", "previous checkpoint"),
])
def test_settled_column_measures_what_the_chart_shows(watched, seeds_server, against, key, name):
    stats = plugin_json(seeds_server, "stats", run="seed0")
    page = watched.open(seeds_server, "view=stability&run=seed0" + (f"&against={against}" if against else ""))
    page.wait_for_selector(f".cv-stability-body{IDLE}")
    assert f"with the {name}" in page.locator(".cv-cards .cv-card-wide h2").inner_text()
    header = page.locator(".cv-table thead th").last.inner_text()
    assert "80%" in header and name.split()[0] in header
    assert name in page.locator(".cv-settled-note").inner_text()
    cells = page.locator(".cv-settled").all_inner_texts()
    expected = [settled_since(layer["steps"], layer[key]) for layer in stats["layers"]]
    assert cells == ["still changing" if s is None else f"since step {s}" for s in expected]
    last = stats["layers"][0]["steps"][-1]
    assert f"since step {last}" not in cells  # never just the latest checkpoint
    watched.assert_clean()
