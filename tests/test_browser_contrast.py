"""Contrast of every button's text, in every state, in both themes (WCAG AA: 4.5:1), in real Chromium.

The ratio is computed from computed styles: each text-bearing element's `color` over the
backgrounds of it and all its ancestors, alpha-composited, with group `opacity` applied.
Disabled buttons are left out: WCAG exempts inactive controls.
"""

from __future__ import annotations

import pytest

from browser_support import IDLE, screenshot

pytestmark = pytest.mark.timeout(600)
AA = 4.5
BACKGROUND = {"light": "rgb(246, 247, 249)", "dark": "rgb(18, 20, 24)"}
LAYER1 = "features.relu1"
# Every view with buttons, each with some of them selected (pressed, current, checked, expanded).
VIEWS = {
    "grid": (f"run=seed0&layer={LAYER1}&show=both&filters=1", ".cv-grid"),
    "grid, projections": (f"run=seed0&layer={LAYER1}&show=projection", ".cv-grid"),
    "unit": (f"view=unit&run=seed0&layer={LAYER1}&unit=2&expand=1", ".cv-unit-body"),
    "stability": ("view=stability&run=seed0", ".cv-stability-body"),
    "stability, previous": ("view=stability&run=seed0&against=previous", ".cv-stability-body"),
    "compare": (f"view=compare&run=seed0&layer={LAYER1}&b_run=seed1", ".cv-compare-grid"),
}
SELECTED = ("[aria-pressed='true'], [aria-selected='true'], [aria-current='page'], [aria-checked='true'],"
            " .cv-selected .cv-evo-step")

# Lowest contrast ratio of the text in `button` against what is drawn behind it.
CONTRAST = """(button) => {
  const parse = (css) => {
    const m = css.match(/^rgba?\\(([^)]*)\\)$/) || css.match(/^color\\(srgb ([^)]*)\\)$/);
    if (!m) throw new Error(`unparsed colour ${css}`);
    const parts = m[1].split(/[\\s,/]+/).filter(Boolean).map(Number);
    const scale = css.startsWith("rgb") ? 255 : 1;
    return [parts[0] / scale, parts[1] / scale, parts[2] / scale, parts.length > 3 ? parts[3] : 1];
  };
  const over = ([r, g, b, a], [R, G, B]) => [r * a + R * (1 - a), g * a + G * (1 - a), b * a + B * (1 - a)];
  const mix = (top, bottom, o) => top.map((v, i) => v * o + bottom[i] * (1 - o));
  const luminance = (rgb) => {
    const [r, g, b] = rgb.map((v) => (v <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4));
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const ratio = (x, y) => {
    const [hi, lo] = [luminance(x), luminance(y)].sort((a, b) => b - a);
    return (hi + 0.05) / (lo + 0.05);
  };
  const hasText = (e) => [...e.childNodes].some((n) => n.nodeType === Node.TEXT_NODE && n.textContent.trim());
  const texts = [button, ...button.querySelectorAll("*")].filter(hasText);
  let worst = null;
  for (const t of texts) {
    const chain = [];
    for (let e = t; e; e = e.parentElement) chain.unshift(e);
    let bg = [1, 1, 1];  // the canvas
    const groups = [];
    for (const e of chain) {
      const style = getComputedStyle(e);
      if (style.visibility === "hidden" || style.display === "none") return null;
      const opacity = Number(style.opacity);
      if (opacity < 1) groups.push([opacity, bg]);
      bg = over(parse(style.backgroundColor), bg);
    }
    let fg = over(parse(getComputedStyle(t).color), bg);
    for (const [opacity, backdrop] of groups.reverse()) {
      fg = mix(fg, backdrop, opacity);
      bg = mix(bg, backdrop, opacity);
    }
    if (groups.some(([opacity]) => opacity === 0)) continue;  // not drawn in this state
    const found = { ratio: ratio(fg, bg), text: t.textContent.trim().slice(0, 30) };
    if (!worst || found.ratio < worst.ratio) worst = found;
  }
  return worst;
}"""

# One button of each kind (class and selection) among the enabled, visible ones.
KINDS = """(selected) => {
  const seen = new Set();
  const picked = [];
  document.querySelectorAll("button:not(:disabled)").forEach((b, i) => {
    if (!b.checkVisibility() || !b.textContent.trim()) return;
    const isSelected = b.matches(selected);
    const kind = `${b.className}|${isSelected}`;
    if (seen.has(kind)) return;
    seen.add(kind);
    b.dataset.contrastProbe = String(i);
    picked.push({ probe: String(i), kind: b.className, selected: isSelected });
  });
  return picked;
}"""


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_every_button_state_has_aa_contrast_in_both_themes(watched, seeds_server, theme):
    page = watched.page
    page.emulate_media(color_scheme=theme)
    failures, measured, selected_kinds = [], 0, set()
    for view, (hash_, ready) in VIEWS.items():
        page = watched.open(seeds_server, hash_)
        page.wait_for_selector(f"{ready}{IDLE}")
        assert page.evaluate("getComputedStyle(document.body).backgroundColor") == BACKGROUND[theme]
        # Final states, not the frames of a transition.
        page.add_style_tag(content="*, *::before, *::after { transition: none !important; animation: none !important; }")
        for button in page.evaluate(KINDS, SELECTED):
            locator = page.locator(f"[data-contrast-probe='{button['probe']}']")
            where = f"{theme} · {view} · .{button['kind'].replace(' ', '.')}{' (selected)' if button['selected'] else ''}"
            if button["selected"]:
                selected_kinds.add(button["kind"])
            page.mouse.move(0, 0)
            states = {"normal": None, "hover": locator.hover,
                      "focus": lambda: (page.mouse.move(0, 0), locator.evaluate("b => b.focus({ focusVisible: true })"))}
            for state, enter in states.items():
                if enter:
                    enter()
                worst = locator.evaluate(CONTRAST)
                if worst is None:
                    continue
                measured += 1
                if worst["ratio"] < AA:
                    failures.append(f"{where} {state}: {worst['ratio']:.2f} for '{worst['text']}'")
            locator.evaluate("b => b.blur()")
        if view == "grid":
            screenshot(page, f"contrast_{theme}")
    assert not failures, "\n".join(failures)
    # The states the issue was about were really measured: pressed toggles, the current tab and view.
    assert {"cv-button cv-show", "cv-button cv-filters-toggle", "cv-layer-tab", "cv-nav-item", "cv-segment"} <= selected_kinds
    assert measured > 60
    watched.assert_clean()
