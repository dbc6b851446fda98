"""Resuming a log dir: only the model whose layers it holds may continue it."""

from __future__ import annotations

from tb_convviz import plugin_data_pb2
from tb_convviz.reader import Layer, Run


def check_same_model(run: Run, layer_infos: dict[str, plugin_data_pb2.LayerInfo], log_dir: str) -> None:
    """Refuse to mix two models in one run: ``run``'s logged layers and shapes must be ``layer_infos``'."""
    held = {layer.name: _shape(layer) for layer in run.layers}
    wanted = {name: _shape(Layer.from_proto(info)) for name, info in layer_infos.items()}
    if not held or held == wanted:
        return
    differ = [f"{name}: {_describe(held.get(name))} there, {_describe(wanted.get(name))} here"
              for name in dict.fromkeys([*held, *wanted]) if held.get(name) != wanted.get(name)]
    raise ValueError(
        f"{log_dir!r} already holds convviz checkpoints of another model or layer choice "
        f"({'; '.join(differ[:4])}{'; ...' if len(differ) > 4 else ''}). One run shows one model: log into a "
        "new directory (another log_dir=), or, to continue that run, build the same model with the same layers=, "
        "k= and probe image size.")


def _shape(layer: Layer) -> tuple:
    return layer.units, layer.k, layer.fmap, layer.input_size


def _describe(shape: tuple | None) -> str:
    if shape is None:
        return "not logged"
    units, k, fmap, size = shape
    where = f"{fmap[0]}×{fmap[1]} maps" if fmap else "no maps"
    return f"{units} units, {where}, k={k}, {size[0]}×{size[1]} input"
