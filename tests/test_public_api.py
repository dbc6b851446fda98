"""The public API names are the objects they say, whatever was imported before."""

import subprocess
import sys

import pytest

PUBLIC = {
    "ConvVizLogger": "tb_convviz.logger",
    "ProbeSet": "tb_convviz.probe",
    "ReceptiveField": "tb_convviz.geometry",
    "receptive_field": "tb_convviz.receptive_field",
    "read_run": "tb_convviz.reader",
}

CHECK = """
import importlib, pkgutil, sys, types
import tb_convviz
submodules = sorted(m.name for m in pkgutil.walk_packages(tb_convviz.__path__, "tb_convviz."))
for name in (reversed(submodules) if {reverse} else submodules):
    importlib.import_module(name)
assert len(submodules) > 10, submodules
from tb_convviz import {names}
for name, module in {public}.items():
    obj = globals()[name]
    assert not isinstance(obj, types.ModuleType), (name, obj)
    assert obj is getattr(sys.modules[module], name), (name, obj)
    assert getattr(tb_convviz, name) is obj, name
assert sorted(tb_convviz.__all__) == sorted({public}), tb_convviz.__all__
print("ok")
"""


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("reverse", [False, True], ids=["sorted", "reversed"])
def test_public_names_are_the_objects_after_importing_every_submodule(reverse):
    code = CHECK.format(reverse=reverse, names=", ".join(PUBLIC), public=PUBLIC)
    assert _run(code).strip() == "ok"


def test_public_names_before_any_submodule_and_the_function_is_callable():
    code = (
        "from tb_convviz import receptive_field\n"
        "import tb_convviz.receptive_field\n"
        "import tb_convviz, torch\n"
        "from tb_convviz import receptive_field as again\n"
        "assert again is receptive_field and tb_convviz.receptive_field is receptive_field\n"
        "net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))\n"
        "print(receptive_field(net, '1', input_size=16).size)\n"
    )
    assert _run(code).strip() == "(5, 5)"


def test_package_import_stays_torch_free():
    code = (
        "import sys, tb_convviz, tb_convviz.plugin.loader, tb_convviz.metadata, tb_convviz.reader\n"
        "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok')\n"
    )
    assert _run(code).strip() == "ok"
