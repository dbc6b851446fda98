"""tb-convviz: Zeiler & Fergus-style top-k patches per unit, live in TensorBoard."""

from tb_convviz.geometry import ReceptiveField

__all__ = ["ConvVizLogger", "ProbeSet", "ReceptiveField", "receptive_field", "read_run"]
__version__ = "0.1.0"


def __getattr__(name):
    # torch-backed names load lazily, so `import tb_convviz.metadata` in the
    # TensorBoard process never imports torch.
    if name == "ConvVizLogger":
        from tb_convviz.logger import ConvVizLogger
        return ConvVizLogger
    if name == "ProbeSet":
        from tb_convviz.probe import ProbeSet
        return ProbeSet
    if name == "receptive_field":
        from tb_convviz.receptive_field import receptive_field
        return receptive_field
    if name == "read_run":
        from tb_convviz.reader import read_run
        return read_run
    raise AttributeError(f"module 'tb_convviz' has no attribute {name!r}")
