"""TensorBoard's entry point for tb-convviz (group ``tensorboard_plugins``).

TensorBoard imports every entry point at start-up and a failing import stops it,
so this module imports only TensorBoard itself; the plugin loads in ``load``,
where TensorBoard logs a failure and carries on without the tab.
"""

from tensorboard.plugins import base_plugin

# Same as tb_convviz.metadata.PLUGIN_NAME, spelled out so that this module imports nothing of ours.
PLUGIN_NAME = "convviz"


class ConvVizLoader(base_plugin.TBLoader):
    """Keeps every convviz checkpoint in both data loaders and loads the ConvViz plugin."""

    def fix_flags(self, flags) -> None:
        # TensorBoard keeps 10 (Python loader) or 100 (Rust loader) points per series by
        # default, picked at random; 0 keeps all. A user's --samples_per_plugin convviz=N wins.
        # A new dict, not setdefault: it may be the caller's own object (TensorBoard.configure).
        hints = flags.samples_per_plugin or {}
        flags.samples_per_plugin = {PLUGIN_NAME: 0, **hints}

    def load(self, context: base_plugin.TBContext) -> base_plugin.TBPlugin:
        from tb_convviz.plugin.convviz_plugin import ConvVizPlugin

        return ConvVizPlugin(context)
