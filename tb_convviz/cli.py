"""The ``tb-convviz`` command. Each subcommand is an ``add_<name>(subparsers)`` and a ``<name>(args)``."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

DEFAULT_PORT = 6006
# --quick: (train, test) images, epochs and probe images: under a minute on 2 idle CPU cores, to ~24%
# test accuracy (features barely formed).
QUICK_SIZES, QUICK_EPOCHS, QUICK_PROBE = (2048, 512), 2, 256
# The default demo: about 2.5 minutes on 2 idle CPU cores (20 on 2 busy ones), to ~94% test accuracy.
DEMO_EPOCHS, DEMO_PROBE = 7, 1024


class CommandError(Exception):
    """A user error a subcommand reports in one line, exiting with status 1."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tb-convviz`` console script."""
    parser = argparse.ArgumentParser(
        prog="tb-convviz", description="Zeiler & Fergus-style top-k patches per unit, live in TensorBoard.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo(subparsers)
    add_checkpoints(subparsers)
    add_export(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CommandError as e:
        print(f"tb-convviz {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tb-convviz {args.command}: interrupted", file=sys.stderr)
        return 130


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="train a small AlexNet and watch its features emerge",
        description="Train a 5-conv AlexNet-style net, logging loss, accuracy and convviz checkpoints of "
        "layers 1-5 to LOGDIR/seedN, with no download; takes about 2.5 minutes on 2 idle CPU cores, "
        "and several times longer when other jobs share them.",
    )
    p.add_argument("--logdir", type=Path, default=Path("runs/demo"),
                   help="TensorBoard log dir; each run writes to LOGDIR/seedN (default: %(default)s)")
    p.add_argument("--data", default="synthetic",
                   help="synthetic (default: generated shapes), imagefolder:PATH, cifar10 or fashion-mnist")
    p.add_argument("--data-root", type=Path, default=None,
                   help="where cifar10 and fashion-mnist are found or downloaded to (default: ~/.cache/tb-convviz/datasets)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help=f"training epochs (default: {DEMO_EPOCHS}, or {QUICK_EPOCHS} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a small, fast run (under a minute on an idle CPU) to check the setup; it reaches only "
                   "about 24%% test accuracy, so the features have barely formed")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the weights and batch order; another seed makes another run to compare (default: 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--probe-size", type=_positive_int, default=None,
                   help=f"test images ranked at each checkpoint (default: {DEMO_PROBE}, or {QUICK_PROBE} with --quick)")
    p.add_argument("--serve", action="store_true",
                   help="serve TensorBoard on LOGDIR while training and afterwards, until Ctrl-C")
    p.add_argument("--port", type=int, default=None,
                   help=f"port for --serve (default: {DEFAULT_PORT} if free, else any free port)")
    p.set_defaults(handler=demo)


def demo(args: argparse.Namespace) -> int:
    import torch

    from tb_convviz.demo.data import DataError, load_data
    from tb_convviz.demo.model import DemoAlexNet
    from tb_convviz.demo.train import train

    device = _device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        data = load_data(args.data, root=args.data_root, limit=QUICK_SIZES if args.quick else None)
    except DataError as e:
        raise CommandError(e) from None
    run_dir = _new_run_dir(args.logdir, f"seed{args.seed}")
    print(f"{data.name}: {len(data.train)} training and {len(data.test)} test images, "
          f"{len(data.class_names)} classes; logging to {run_dir}", flush=True)
    with contextlib.ExitStack() as stack:
        if args.serve:
            server = stack.enter_context(_TensorBoard(args.logdir, _port(args.port)))
            print(f"TensorBoard: {server.url} (live while training)", flush=True)
        else:
            print(f"Watch live: tensorboard --logdir {args.logdir}, then open http://localhost:{DEFAULT_PORT}/#convviz",
                  flush=True)
        torch.manual_seed(args.seed)
        model = DemoAlexNet(num_classes=len(data.class_names), in_channels=data.channels).to(device)
        accuracy = train(
            model, data, run_dir,
            epochs=args.epochs or (QUICK_EPOCHS if args.quick else DEMO_EPOCHS),
            probe_size=args.probe_size or (QUICK_PROBE if args.quick else DEMO_PROBE),
            seed=args.seed, layers=DemoAlexNet.LOGGED_LAYERS,
        )
        print(f"Test accuracy: {accuracy:.1%} on {len(data.test)} images", flush=True)
        if args.serve:
            print(f"TensorBoard: {server.url} (Ctrl-C to stop)", flush=True)
            server.wait()
    return 0


def add_checkpoints(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "checkpoints", help="log saved checkpoint files, to compare training after the fact",
        description="Rank a probe set with each checkpoint file and log the top-k patches of layers 1-5 "
        "into LOGDIR, one step per file (the last number in its name, --steps, or the file order). "
        "Steps already in LOGDIR are skipped, so running it again logs only new checkpoints.",
    )
    p.add_argument("--model", required=True,
                   help="torchvision:NAME (e.g. torchvision:alexnet) or package.module:factory")
    p.add_argument("--num-classes", type=_positive_int, default=None,
                   help="passed to the model factory as num_classes= (default: the factory's own)")
    p.add_argument("--weights", required=True,
                   help="glob of checkpoint files, quoted (e.g. 'ckpts/*.pt'): state_dicts, plain or under "
                   "'state_dict' or 'model' (Lightning .ckpt files too)")
    p.add_argument("--data", default="synthetic",
                   help="probe images: synthetic (default), imagefolder:PATH, cifar10 or fashion-mnist")
    p.add_argument("--data-root", type=Path, default=None,
                   help="where cifar10 and fashion-mnist are found or downloaded to (default: ~/.cache/tb-convviz/datasets)")
    p.add_argument("--image-size", type=_positive_int, default=64,
                   help="side the probe images are resized to, as in training (default: %(default)s)")
    p.add_argument("--logdir", type=Path, required=True, help="the run directory to log into")
    p.add_argument("--steps", default=None, help="comma-separated steps, one per file in step order")
    p.add_argument("--layers", default="auto",
                   help="comma-separated module names (default: auto, 5 layers spread over the depth)")
    p.add_argument("--k", type=_positive_int, default=9, help="top images per unit (default: %(default)s)")
    p.add_argument("--probe-size", type=_positive_int, default=DEMO_PROBE,
                   help="test images ranked at each checkpoint (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe images drawn (default: 0)")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="probe batch size (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(handler=checkpoints)


def checkpoints(args: argparse.Namespace) -> int:
    from tb_convviz.checkpoints import checkpoint_files, log_checkpoints, resolve_model
    from tb_convviz.demo.data import DataError, load_data
    from tb_convviz.probe import ProbeSet

    try:
        steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    except ValueError:
        raise CommandError(f"--steps {args.steps!r} is not a comma-separated list of integers") from None
    layers = args.layers if args.layers == "auto" else [name.strip() for name in args.layers.split(",")]
    device = _device(args.device) if args.device else None
    try:
        factory = resolve_model(args.model, args.num_classes)
        files = checkpoint_files(args.weights)
        data = load_data(args.data, size=args.image_size, root=args.data_root, seed=args.seed)
        probe = ProbeSet.from_dataset(data.test, n=args.probe_size, seed=args.seed, mean=data.mean, std=data.std,
                                      class_names=data.class_names)
        results = log_checkpoints(factory, files, probe, args.logdir, steps, layers=layers, k=args.k,
                                  batch_size=args.batch_size, device=device)
    except (DataError, FileNotFoundError, TypeError, ValueError) as e:
        raise CommandError(e) from None
    done = f"steps {', '.join(map(str, results.logged))}" if results.logged else "no new checkpoints"
    print(f"logged {done} to {args.logdir}"
          + (f"; skipped {len(results.skipped)} already logged or out of order" if results.skipped else ""))
    if results.failed:
        print(f"tb-convviz checkpoints: {len(results.failed)} of {len(files)} files failed:", file=sys.stderr)
        for reason in results.failed.values():
            print(f"  {reason}", file=sys.stderr)
        return 1
    print(f"See them: tensorboard --logdir {args.logdir}, then open http://localhost:{DEFAULT_PORT}/#convviz")
    return 0


def add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a figure of a logged layer for a paper or slides",
        description="Write a grid of a layer's top-k mosaics at one checkpoint (as in Zeiler & Fergus, "
        "Fig. 2) or, with --evolution, units across checkpoints (Fig. 4), from the event files alone.",
    )
    p.add_argument("--logdir", type=Path, required=True, help="TensorBoard log dir")
    p.add_argument("--run", default=".", help="run inside LOGDIR (default: LOGDIR itself)")
    p.add_argument("--layer", required=True, help="layer name, or its 1-based index (1 to 5)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--units", default=None, help="units such as 0-15 or 3,7,9 (default: the first 16)")
    p.add_argument("--evolution", action="store_true",
                   help="units (rows) across checkpoints (columns), each with its strongest patches")
    p.add_argument("--unit", default=None, help="the unit for --evolution (same as --units)")
    p.add_argument("--steps", default=None, help="comma-separated checkpoints for --evolution (default: all)")
    p.add_argument("--top", type=_positive_int, default=1,
                   help="patches per unit and checkpoint for --evolution (default: %(default)s)")
    p.add_argument("--projections", action="store_true",
                   help="beside each unit's patches, their deconvnet projections (Fig. 2); with --evolution, "
                   "require projections at every step")
    p.add_argument("--patches", action="store_true",
                   help="with --evolution, show patches even where projections were logged")
    p.add_argument("--patch-size", type=_positive_int, default=None,
                   help="pixels per patch side (default: 48, or 64 with --evolution)")
    p.add_argument("--field", choices=("effective", "theoretical"), default="effective",
                   help="crop each patch to the layer's effective receptive field, kept inside the image (the "
                   "default; runs logged without it use the theoretical field), or to the whole theoretical field")
    p.add_argument("--out", type=Path, required=True, help="image file to write (.png, .jpg or .pdf)")
    p.set_defaults(handler=export)


def export(args: argparse.Namespace) -> int:
    from tb_convviz import export as figures

    units_text = args.unit if args.unit is not None else args.units
    try:
        steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    except ValueError:
        raise CommandError(f"--steps {args.steps!r} is not a comma-separated list of integers") from None
    try:
        run = figures.open_run(str(args.logdir), args.run)
        layer = figures.find_layer(run, args.layer)
        units = figures.parse_units(units_text, layer.units) if units_text is not None else None
        if args.projections and args.patches:
            raise CommandError("give --projections or --patches, not both")
        if args.evolution:
            if units is None:
                raise CommandError("--evolution needs the unit to follow: --unit U (or --units 0-3 for several)")
            figure = figures.evolution_figure(run, layer.name, units, steps, top=args.top,
                                              patch_size=args.patch_size or 64,
                                              projections=True if args.projections else False if args.patches else None,
                                              theoretical=args.field == "theoretical")
        else:
            figure = figures.grid_figure(run, layer.name, args.step, units, patch_size=args.patch_size or 48,
                                         projections=args.projections, theoretical=args.field == "theoretical")
    except (OSError, ValueError) as e:
        raise CommandError(e) from None
    try:
        figure.save(args.out)
    except (OSError, ValueError) as e:
        raise CommandError(f"cannot write {args.out} ({e}): give a .png, .jpg or .pdf path in an existing folder") from None
    print(f"wrote {args.out} ({figure.width}x{figure.height} pixels)")
    return 0


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CommandError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def _new_run_dir(logdir: Path, name: str) -> Path:
    """``logdir/name``, or ``logdir/name-2``, ``-3``... if it already holds a run."""
    run_dir, n = logdir / name, 1
    while run_dir.exists() and any(run_dir.iterdir()):
        n += 1
        run_dir = logdir / f"{name}-{n}"
    return run_dir


# Runs TensorBoard so that it ends when the demo ends, however the demo ends (SIGKILL, an OOM kill):
# on Linux the kernel sends it SIGTERM when its parent dies (PR_SET_PDEATHSIG); elsewhere, and for a
# parent that died before prctl ran, a thread sees the parent pid change. TensorBoard exits cleanly
# on SIGTERM, and its data server exits when its stdin closes.
_TENSORBOARD_CHILD = """
import ctypes, os, signal, sys, threading, time
parent = int(sys.argv.pop(1))
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

def watchdog():
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    os._exit(1)

threading.Thread(target=watchdog, daemon=True).start()
sys.argv[0] = "tensorboard"
from tensorboard.main import run_main
sys.exit(run_main())
"""


class _TensorBoard:
    """``tensorboard --logdir`` in a subprocess that ends with this process.

    It has a session of its own, so that Ctrl-C stops only ``wait``. Make it in the main
    thread: Linux's parent-death signal follows the thread that started the process.
    """

    def __init__(self, logdir: Path, port: int) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        self.url = f"http://localhost:{port}/#convviz"
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _TENSORBOARD_CHILD, str(os.getpid()), "--logdir", str(logdir), "--port", str(port)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait(self) -> None:
        """Return on Ctrl-C; raise CommandError if TensorBoard exits by itself."""
        try:
            while self._proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            return
        self._log.seek(0)
        output = self._log.read().decode(errors="replace").strip()
        raise CommandError(f"TensorBoard exited with status {self._proc.returncode}:\n{output}")

    def __enter__(self) -> "_TensorBoard":
        # TensorBoard has a session of its own, so a plain `kill` of this process must
        # unwind through __exit__ to stop it too, instead of leaving it running.
        self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_signal)
        # Ctrl-C is how the demo stops serving, even when it was started with SIGINT ignored
        # (`nohup`, a background job of a script, some CIs), which Python would otherwise keep.
        self._previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous_sigterm)
        signal.signal(signal.SIGINT, self._previous_sigint)
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()


def _exit_on_signal(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def _port(requested: int | None) -> int:
    """``requested`` if it is free; without one, DEFAULT_PORT if free, else any free port."""
    for candidate in (requested,) if requested else (DEFAULT_PORT, 0):
        with socket.socket() as s:
            try:
                s.bind(("localhost", candidate))
            except OSError:
                continue
            return s.getsockname()[1]
    if requested:
        raise CommandError(f"--port {requested} is in use: pass another, or leave --port out to pick a free one")
    raise CommandError("found no free TCP port for TensorBoard: pass --port")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
