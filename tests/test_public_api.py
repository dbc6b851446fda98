"""The public API names are the objects they say, whatever was imported before."""

import subprocess
import sys

PUBLIC = {
    "ConvVizLogger": "tb_convviz.logger",
    "ProbeSet": "tb_convviz.probe",
    "ReceptiveField": "tb_convviz.geometry",
    "receptive_field": "tb_convviz.receptive_field",
    "read_run": "tb_convviz.reader",
}

# In one fresh interpreter: the names before any submodule, then after importing every
# submodule (in reverse order, so the plugin and CLI come first), then the function works.
CHECK = """
import importlib, pkgutil, sys, types
from tb_convviz import {names}
first = dict(globals())
import tb_convviz
submodules = sorted(m.name for m in pkgutil.walk_packages(tb_convviz.__path__, "tb_convviz."))
assert len(submodules) > 10, submodules
for name in reversed(submodules):
    importlib.import_module(name)
import tb_convviz.receptive_field
from tb_convviz import {names}
for name, module in {public}.items():
    obj = globals()[name]
    assert not isinstance(obj, types.ModuleType), (name, obj)
    assert obj is getattr(sys.modules[module], name) is first[name], (name, obj)
    assert getattr(tb_convviz, name) is obj, name
assert sorted(tb_convviz.__all__) == sorted({public}), tb_convviz.__all__
import torch
net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))
print(receptive_field(net, "1", input_size=16).size)
"""


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_public_names_are_the_objects_after_importing_every_submodule():
    assert _run(CHECK.format(names=", ".join(PUBLIC), public=PUBLIC)).strip() == "(5, 5)"


def test_package_import_stays_torch_free():
    code = (
        "import sys, tb_convviz, tb_convviz.plugin.loader, tb_convviz.metadata, tb_convviz.reader\n"
        "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok')\n"
    )
    assert _run(code).strip() == "ok"
