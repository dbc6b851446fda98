"""tb-convviz: Zeiler & Fergus-style top-k patches per unit, live in TensorBoard."""

import importlib
import sys
import types

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


class _Package(types.ModuleType):
    # Importing submodule `tb_convviz.receptive_field` makes the import system set the
    # package attribute of that name to the module, which would hide the function of the
    # public API from then on. Public names always resolve through __getattr__ instead;
    # the submodule itself stays reachable as sys.modules["tb_convviz.receptive_field"].
    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
