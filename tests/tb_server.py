"""A real ``tensorboard`` process for tests and benchmarks: ``with tensorboard_server(logdir, load_fast=True) as url``.

The process runs TensorBoard's own ``run_main`` (what the ``tensorboard`` command
runs), with installed entry-point plugins, on a free port. On exit it is stopped
by its pid, and the context manager fails if the process ever imported torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator

# Runs TensorBoard and, at exit (TensorBoard exits through atexit on SIGTERM), records
# which torch modules the process had imported.
_LAUNCHER = """
import atexit, json, os, sys
def _report():
    with open(os.environ["TB_CONVVIZ_TORCH_REPORT"], "w") as f:
        json.dump(sorted(m for m in sys.modules if m.split(".")[0] == "torch"), f)
atexit.register(_report)
sys.argv[0] = "tensorboard"
from tensorboard.main import run_main
sys.exit(run_main())
"""
_SERVING = re.compile(r"TensorBoard \S+ at (http://127\.0\.0\.1:\d+/)")


@dataclasses.dataclass(frozen=True)
class TensorBoardProcess:
    """A running TensorBoard: its base URL (ending in ``/``) and pid."""

    url: str
    pid: int

    def peak_rss_bytes(self) -> int:
        """Peak resident memory of TensorBoard and its child processes (the Rust data server)."""
        pids = [self.pid]
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{task}/children") as f:
                    pids += [int(p) for p in f.read().split()]
            except FileNotFoundError:  # a request thread that has finished
                pass
        return sum(_peak_rss(pid) for pid in pids)


@contextlib.contextmanager
def tensorboard_server(logdir: str, load_fast: bool, *, extra_args: tuple[str, ...] = (),
                       start_timeout: float = 90.0) -> Iterator[str]:
    """Start ``tensorboard --logdir logdir`` on 127.0.0.1; yield its base URL (ending in ``/``)."""
    with tensorboard_process(logdir, load_fast, extra_args=extra_args, start_timeout=start_timeout) as tb:
        yield tb.url


@contextlib.contextmanager
def tensorboard_process(logdir: str, load_fast: bool, *, extra_args: tuple[str, ...] = (),
                        start_timeout: float = 90.0) -> Iterator[TensorBoardProcess]:
    """Like :func:`tensorboard_server`, yielding the :class:`TensorBoardProcess`."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "torch_modules.json")
        log_path = os.path.join(tmp, "stderr.txt")
        # A short reload interval lets tests see new checkpoints soon; later flags win.
        args = [sys.executable, "-c", _LAUNCHER, "--logdir", logdir, "--host", "127.0.0.1", "--port", "0",
                f"--load_fast={'true' if load_fast else 'false'}", "--reload_interval", "1", *extra_args]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log,
                                    env={**os.environ, "TB_CONVVIZ_TORCH_REPORT": report})
        try:
            url = _wait_for_url(proc, log_path, start_timeout)
            yield TensorBoardProcess(url=url, pid=proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if os.path.exists(report):
            with open(report) as f:
                torch_modules = json.load(f)
            assert not torch_modules, f"the TensorBoard process imported torch: {torch_modules[:5]}"
        else:
            raise AssertionError("TensorBoard did not exit cleanly; stderr:\n" + _tail(log_path))


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _wait_for_url(proc: subprocess.Popen, log_path: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tensorboard exited with {proc.returncode}:\n{_tail(log_path)}")
        match = _SERVING.search(_tail(log_path, 1 << 20))
        if match:
            url = match.group(1)
            try:
                urllib.request.urlopen(url + "data/plugins_listing", timeout=5).read()
                return url
            except (urllib.error.URLError, ConnectionError):
                pass
        time.sleep(0.2)
    raise RuntimeError(f"tensorboard did not start within {timeout} s:\n{_tail(log_path)}")


def _tail(path: str, limit: int = 4000) -> str:
    with open(path, "rb") as f:
        return f.read()[-limit:].decode("utf-8", "replace")


def get(url: str, timeout: float = 60.0) -> tuple[int, str, bytes]:
    """GET ``url``; return (status, content type, body), also for error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


PLUGIN_API = "data/plugin/convviz/"


def served_runs(api: str) -> dict[str, dict]:
    """The plugin's run listing at ``api`` (a server URL + PLUGIN_API) by run name; empty until it answers 200."""
    status, _, body = get(api + "runs")
    return {r["run"]: r for r in json.loads(body)["runs"]} if status == 200 else {}


def plugin_json(server: str, route: str, **params):
    """GET the convviz ``route`` of ``server`` with ``params``; assert a 200 and return the decoded JSON."""
    status, _, body = get(f"{server}{PLUGIN_API}{route}?{urllib.parse.urlencode(params)}")
    assert status == 200, body
    return json.loads(body)


def wait_for(predicate, timeout: float = 90.0, interval: float = 0.5):
    """Poll ``predicate()`` until it returns a truthy value (returned), or raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
