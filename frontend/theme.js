// Follow TensorBoard's theme setting (light, dark, or the browser's default), not only the OS.
// TensorBoard keeps it in localStorage `_tb_global_settings` as `{"theme": "browser_default" |
// "light" | "dark"}` and shows it as the class `dark-mode` on its <body>. The iframe shares
// TensorBoard's origin, so both can be read; `prefers-color-scheme` decides "browser_default".

const SETTINGS_KEY = "_tb_global_settings";
const THEMES = new Set(["light", "dark"]);

/** "light", "dark", or null to follow the browser (TensorBoard's "browser_default"). */
export function tensorBoardTheme() {
  try {
    const body = window.parent !== window ? window.parent.document.body : null;
    // Inside TensorBoard its <body> says what it shows, whichever way it was chosen.
    if (body?.querySelector("tb-webapp, app-header, tf-tensorboard")) {
      return body.classList.contains("dark-mode") ? "dark" : "light";
    }
  } catch {
    // a cross-origin embedder: fall back to the stored setting
  }
  try {
    const theme = JSON.parse(localStorage.getItem(SETTINGS_KEY) ?? "{}")?.theme;
    return THEMES.has(theme) ? theme : null;
  } catch {
    return null;
  }
}

function apply() {
  const theme = tensorBoardTheme();
  if (theme) document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
}

/** Apply TensorBoard's theme now and whenever it changes. */
export function followTensorBoardTheme() {
  apply();
  // Another document of the origin (TensorBoard's page) changed the setting.
  window.addEventListener("storage", (e) => { if (e.key === SETTINGS_KEY || e.key === null) apply(); });
  try {
    if (window.parent !== window) {
      new MutationObserver(apply).observe(window.parent.document.body, { attributes: true, attributeFilter: ["class"] });
    }
  } catch {
    // cross-origin: the storage event above still applies
  }
}
