"""Log saved checkpoints after the fact, so training that has already run can be compared."""

from __future__ import annotations

import dataclasses
import glob
import importlib
import os
import pickle
import re
import sys
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from tb_convviz.logger import ConvVizLogger
from tb_convviz.probe import ProbeSet
from tb_convviz.reader import event_files, read_run

_NUMBER = re.compile(r"\d+")


@dataclasses.dataclass
class CheckpointResults:
    """What :func:`log_checkpoints` did: steps logged, steps skipped and files failed, with why (naming the file)."""

    logged: list[int] = dataclasses.field(default_factory=list)
    skipped: dict[int, str] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)


def log_checkpoints(
    model_factory: Callable[[], nn.Module],
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    probe: ProbeSet | torch.Tensor,
    log_dir: str | os.PathLike,
    steps: Sequence[int] | None = None,
    *,
    layers: str | Sequence[str] = "auto",
    k: int = 9,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CheckpointResults:
    """Log the top-``k`` probe images of each checkpoint file into ``log_dir``, one step per file.

    ``paths`` is a glob pattern or a list of files holding state_dicts (plain, or under a
    ``state_dict`` or ``model`` key, as in Lightning ``.ckpt`` files). Steps are ``steps``,
    else the last number in each file name, else the file order; files are logged in
    increasing step order. Steps already in ``log_dir`` are skipped, so re-running after
    more checkpoints were saved logs only the new ones. A file that fails to load is
    reported and skipped; the others still run.
    """
    files = checkpoint_files(paths)
    step_of = dict(zip(files, _steps(files, steps)))
    model = model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
    device = torch.device(device) if device is not None else _default_device()
    model.to(device)
    log_dir = os.fspath(log_dir)
    logged = set(read_run(log_dir).steps) if os.path.isdir(log_dir) and event_files(log_dir) else set()
    last = max(logged, default=-1)

    results = CheckpointResults()
    todo = []
    for path in sorted(files, key=step_of.__getitem__):
        step = step_of[path]
        if step in logged:
            results.skipped[step] = "already logged"
        elif step < last:
            results.skipped[step] = (
                f"{path}: step {step} comes before step {last}, the last one logged in {log_dir!r}; TensorBoard "
                "would drop every later checkpoint, so it is skipped (log into a new directory to include it)"
            )
        else:
            todo.append((step, path))
    for message in results.skipped.values():
        if message != "already logged":
            tqdm.write(message, file=sys.stderr)
    if not todo:
        return results

    with ConvVizLogger(model, probe, log_dir, layers=layers, k=k, batch_size=batch_size, device=device) as logger:
        for step, path in tqdm(todo, desc="checkpoints", unit="ckpt", disable=not progress):
            try:
                load_weights(model, path)
            except (ValueError, RuntimeError) as e:
                results.failed[path] = str(e)
                tqdm.write(f"skipped: {e}", file=sys.stderr)
                continue
            if logger.log(step):
                results.logged.append(step)
            else:
                results.failed[path] = f"{path}: the probe pass or the write failed (see the warning above)"
    return results


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the state_dict in file ``path`` into ``model``, finding it under the usual keys and prefixes.

    Raises ValueError, naming the file, when the file holds no state_dict or one that does not fit.
    """
    path = os.fspath(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ValueError(f"{path} could not be read: {e}") from None
    except Exception as e:
        # torch's own text for the weights-only refusal is long and suggests turning safety off.
        detail = "" if isinstance(e, pickle.UnpicklingError) else f" ({type(e).__name__}: {str(e)[:100]})"
        raise ValueError(
            f"{path} is not a PyTorch checkpoint of tensors{detail}. Is the file complete? Files holding "
            "pickled Python objects (a whole model, say) are not loaded, for safety: save model.state_dict()"
        ) from None
    state = _state_dict_in(content)
    if state is None:
        raise ValueError(
            f"{path} holds no state_dict: expected a dict of tensors, or one under a 'state_dict' or 'model' key"
        )
    model.load_state_dict(_fit(state, model.state_dict(), path))


def _state_dict_in(content) -> dict[str, torch.Tensor] | None:
    if isinstance(content, dict):
        for key in ("state_dict", "model"):
            if isinstance(content.get(key), dict):
                return _state_dict_in(content[key])
        if content and all(isinstance(v, torch.Tensor) for v in content.values()):
            return content
    return None


def _fit(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """``state`` with the prefix stripped that maps its keys onto ``expected``'s.

    Covers ``module.`` (DataParallel, DDP), ``_orig_mod.`` (torch.compile) and a
    LightningModule's attribute name (``model.``), alone or combined.
    """
    anchor = next(iter(expected))
    prefixes = sorted({key[:-len(anchor)] for key in state if key.endswith(anchor)}, key=len)
    for prefix in prefixes:
        fitted = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        if fitted.keys() == expected.keys():
            wrong = [
                f"{key} is {tuple(fitted[key].shape)} in the file, {tuple(value.shape)} in the model"
                for key, value in expected.items() if fitted[key].shape != value.shape
            ]
            if wrong:
                raise ValueError(
                    f"{path} does not fit the model: {wrong[0]}"
                    + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else "")
                    + "; check --model and --num-classes"
                )
            return fitted
    fitted = {re.sub(r"^(module\.)+", "", key): value for key, value in state.items()}
    missing = [key for key in expected if key not in fitted]
    unexpected = [key for key in fitted if key not in expected]
    raise ValueError(
        f"{path} does not fit the model: it lacks {len(missing)} of the model's {len(expected)} weights "
        f"(e.g. {', '.join(missing[:3])}) and has {len(unexpected)} the model does not know "
        f"(e.g. {', '.join(unexpected[:3])}). Is it a checkpoint of another architecture? Check --model"
    )


def resolve_model(spec: str, num_classes: int | None = None) -> Callable[[], nn.Module]:
    """The factory named by ``spec``: ``torchvision:NAME`` or ``package.module:callable``.

    ``num_classes`` is passed to the factory when given. Modules are also looked up
    in the current directory, as ``python -m`` would.
    """
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise ValueError(
            f"model {spec!r} is not MODULE:FACTORY; use e.g. torchvision:alexnet or mypackage.models:make_net"
        )
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    if source == "torchvision":
        import torchvision

        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            raise ValueError(
                f"unknown torchvision model {name!r}; classification models: {', '.join(available)}"
            )
        return lambda: torchvision.models.get_model(name, weights=None, **kwargs)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(source)
    except ImportError as e:
        raise ValueError(f"cannot import {source!r} for model {spec!r}: {e}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"module {source!r} has no callable {name!r} for model {spec!r}")
    return lambda: factory(**kwargs)


def checkpoint_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """The files of a glob pattern (in natural order: ``ckpt_9`` before ``ckpt_10``) or of a list."""
    if isinstance(paths, (str, os.PathLike)):
        pattern = os.path.expanduser(os.fspath(paths))
        files = sorted(glob.glob(pattern), key=_natural_key)
        if not files:
            raise FileNotFoundError(f"no checkpoint files match {pattern!r}")
    else:
        files = [os.fspath(p) for p in paths]
        if not files:
            raise ValueError("no checkpoint files given")
    if len(set(files)) != len(files):
        raise ValueError("the same checkpoint file is listed twice")
    return files


def _steps(files: list[str], steps: Sequence[int] | None) -> list[int]:
    if steps is not None:
        steps = [int(s) for s in steps]
        if len(steps) != len(files):
            raise ValueError(f"got {len(steps)} steps for {len(files)} checkpoint files")
    else:
        numbers = [_NUMBER.findall(os.path.basename(f)) for f in files]
        if not any(numbers):
            return list(range(len(files)))
        if not all(numbers):
            unnamed = next(f for f, n in zip(files, numbers) if not n)
            raise ValueError(
                f"cannot tell the step of {unnamed}: its name has no number, unlike the other files; "
                "pass the steps explicitly (--steps) or leave that file out"
            )
        steps = [int(n[-1]) for n in numbers]
    if min(steps) < 0:
        raise ValueError(f"steps must not be negative, got {min(steps)}")
    if len(set(steps)) != len(steps):
        twice = sorted({s for s in steps if steps.count(s) > 1})
        raise ValueError(
            f"several checkpoint files map to step {twice[0]}; pass the steps explicitly (--steps)"
        )
    return steps


def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
