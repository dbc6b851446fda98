"""Compare across two trained seeds and within one run, in real Chromium: matched units, A/B labels, shared images."""

from __future__ import annotations

import urllib.parse

import pytest

from browser_support import IDLE, hash_state, screenshot
from tb_server import plugin_json

pytestmark = pytest.mark.timeout(300)
LAYER = "features.relu3"


def tiles(page) -> dict[int, dict]:
    """Per tile: the units and labels of its two sides, their mosaic URLs and the outlined cells."""
    rows = page.eval_on_selector_all(".cv-pair", """els => els.map(e => ({
        unit: Number(e.dataset.unit),
        labels: [...e.querySelectorAll('.cv-side-label')].map(l => l.textContent),
        src: [...e.querySelectorAll('.cv-mosaic')].map(i => i.currentSrc),
        outlined: [...e.querySelectorAll('.cv-mosaic-cells')].map(c =>
            [...c.children].flatMap((cell, rank) => cell.classList.contains('cv-shared') ? [rank] : [])),
        unique: e.classList.contains('cv-unique'),
    }))""")
    return {row["unit"]: row for row in rows}


def query(src: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(src).query))


def test_two_seeds_are_compared_by_matched_units(watched, seeds_server):
    page = watched.open(seeds_server, f"view=compare&run=seed0&b_run=seed1&layer={LAYER}")
    page.wait_for_selector(f".cv-compare-grid{IDLE}")
    step = int(hash_state(page)["step"])
    assert hash_state(page)["b_step"] == str(step)  # across runs: the same step by default
    assert page.locator("[aria-label='Match units by top-k overlap']").is_checked()
    expected = plugin_json(seeds_server, "compare", run="seed0", layer=LAYER, step=step, other_run="seed1",
                   other_step=step, match=1)
    shown = tiles(page)
    assert len(shown) == len(expected["units"])
    for unit in expected["units"]:
        tile = shown[unit["unit"]]
        # Each unit of A beside its match in B, both labelled.
        assert tile["labels"] == [f"A #{unit['unit']}", f"B #{unit['other_unit']}"]
        a, b = (query(src) for src in tile["src"])
        assert (a["run"], a["unit"]) == ("seed0", str(unit["unit"]))
        assert (b["run"], b["unit"]) == ("seed1", str(unit["other_unit"]))
        # The shared images are outlined in both mosaics.
        assert tile["outlined"] == [sorted(unit["ranks"]), sorted(unit["other_ranks"])]
        assert tile["unique"] == (unit["overlap"] == 0)
    summary = page.locator(".cv-summary").inner_text()
    assert f"{expected['unique']} unique features" in summary
    assert f"unit for unit: {round(100 * expected['unit_for_unit_mean_overlap'])}%" in summary
    assert expected["mean_overlap"] > expected["unit_for_unit_mean_overlap"]
    screenshot(page, "compare_matched_seeds")
    # A's zoom outlines the same shared images.
    first = expected["units"][0]
    page.click(f".cv-pair[data-unit='{first['unit']}'] .cv-side-A .cv-side-image")
    zoom = page.locator("dialog.cv-zoom")
    zoom.wait_for()
    assert zoom.locator(".cv-zoom-patch.cv-shared").count() == len(first["shared"])
    assert zoom.locator(".cv-dialog-head").inner_text().startswith("A · Unit")
    page.keyboard.press("Escape")
    watched.assert_clean()


def test_within_a_run_matching_is_a_toggle(watched, seeds_server):
    page = watched.open(seeds_server, f"view=compare&run=seed0&layer={LAYER}&step=0&b_step=8")
    page.wait_for_selector(f".cv-compare-grid{IDLE}")
    toggle = page.locator("[aria-label='Match units by top-k overlap']")
    assert not toggle.is_checked() and "match" not in hash_state(page)
    assert all(t["labels"] == [f"A #{u}", f"B #{u}"] for u, t in tiles(page).items())
    toggle.check()
    page.wait_for_function("location.hash.includes('match=1')")
    page.wait_for_selector(f".cv-compare-grid{IDLE}")
    expected = plugin_json(seeds_server, "compare", run="seed0", layer=LAYER, step=0, other_step=8, match=1)
    moved = [u for u in expected["units"] if u["other_unit"] != u["unit"]]
    assert moved  # 14 of 24 units of this layer match another index between steps 0 and 8
    assert page.locator(".cv-chip-moved").count() == len(moved)
    for u in moved:
        assert tiles(page)[u["unit"]]["labels"] == [f"A #{u['unit']}", f"B #{u['other_unit']}"]
    screenshot(page, "compare_matched_within_run")
    watched.assert_clean()


def test_switching_a_run_keeps_the_step_or_takes_the_nearest(watched, seeds_server):
    page = watched.open(seeds_server, f"view=compare&run=seed0&layer={LAYER}&step=6&b_step=3")
    page.wait_for_selector(f".cv-compare-grid{IDLE}")
    page.select_option("[aria-label='Run B']", "seed1")
    page.wait_for_function("location.hash.includes('b_run=seed1')")
    page.wait_for_selector(f".cv-compare-grid{IDLE}")
    assert (hash_state(page)["step"], hash_state(page)["b_step"]) == ("6", "3")
    page.select_option("[aria-label='Run A']", "seed1")
    page.wait_for_function("location.hash.includes('run=seed1&')")
    page.wait_for_selector(f".cv-compare-grid{IDLE}")
    assert (hash_state(page)["run"], hash_state(page)["step"], hash_state(page)["b_step"]) == ("seed1", "6", "3")
    # A step the run does not have (a link from a longer run) becomes its nearest step.
    page = watched.open(seeds_server, f"view=compare&run=seed0&layer={LAYER}&step=-3&b_run=seed1&b_step=11")
    page.wait_for_selector(f".cv-compare-grid{IDLE}")
    assert (hash_state(page)["step"], hash_state(page)["b_step"]) == ("0", "8")
    watched.assert_clean()


@pytest.mark.parametrize("link, a, b", [
    # run and step are side A; b_run and b_step side B, as a person writing a link expects.
    ("run=seed0&step=3&b_run=seed1&b_step=6", ("seed0", 3), ("seed1", 6)),
    # Links from before named A other_run/other_step and B run/step: they still open the same comparison.
    ("run=seed1&step=6&other_run=seed0&other_step=3", ("seed0", 3), ("seed1", 6)),
    ("run=seed0&step=8&other_step=0", ("seed0", 0), ("seed0", 8)),
])
def test_links_name_side_a_by_run_and_old_links_keep_working(watched, seeds_server, link, a, b):
    page = watched.open(seeds_server, f"view=compare&layer={LAYER}&{link}")
    page.wait_for_selector(f".cv-compare-grid{IDLE}")
    state = hash_state(page)
    assert (state["run"], int(state["step"]), state["b_run"], int(state["b_step"])) == (*a, *b)
    assert "other_run" not in state and "other_step" not in state  # rewritten in today's form
    assert page.locator("[aria-label='Run A']").input_value() == a[0]
    assert page.locator("[aria-label='Step A']").input_value() == str(a[1])
    assert page.locator("[aria-label='Run B']").input_value() == b[0]
    assert page.locator("[aria-label='Step B']").input_value() == str(b[1])
    tile = next(iter(tiles(page).values()))
    sources = [query(src) for src in tile["src"]]
    assert [(s["run"], int(s["step"])) for s in sources] == [a, b]
    watched.assert_clean()
