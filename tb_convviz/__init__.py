"""tb-convviz: Zeiler & Fergus-style top-k patches per unit, live in TensorBoard."""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ConvVizLogger": "tb_convviz.logger",
    "ProbeSet": "tb_convviz.probe",
    "ReceptiveField": "tb_convviz.geometry",
    "receptive_field": "tb_convviz.receptive_field",
    "read_run": "tb_convviz.reader",
}
__all__ = list(_LAZY)


def __getattr__(name):
    # Names load lazily: TensorBoard imports this package at start-up (a failing
    # import would stop it), and the TensorBoard process must never import torch.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tb_convviz' has no attribute {name!r}")
