"""A SuperExec for the hospital that starts each ClientApp in a process with PyTorch already imported.

Flower 1.41 runs every message a site receives in a fresh `flwr-clientapp` process, which exits after one
task, and importing torch and torchvision is most of that process's start: 3–10 s per message on a small
machine, more than all of Flower's own per-round work. This is Flower's own SuperExec
(`flwr.supercore.superexec.run_superexec`: it asks the SuperNode for tasks and starts them) with one
change: a ClientApp task starts as a child of a fork server that imported those libraries once, and
every other task goes to Flower's own executor. The child runs Flower's `run_clientapp`, which loads the
ClientApp from the run's FAB as usual: the center's app code is what runs, only its imports are warm.

The SuperNode runs in process isolation with this beside it; `fedmammo node` (`client.node`) starts and
supervises both, as:

    flower-supernode --isolation process --runtime-api-address 127.0.0.1:PORT ...
    fedmammo superexec --runtime-api-address 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import multiprocessing
from multiprocessing import forkserver

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec import run_superexec as flower_superexec
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import run_clientapp

PRELOAD = ["torch", "torchvision", "numpy", "scipy.special", "flwr.supernode.runtime.run_clientapp"]
"""Imported once by the fork server; fedmammo's own modules are not, so that the FAB's copy is loaded."""


def _run_task(spec: ExecutionSpec) -> None:
    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=spec.runtime_dependency_install,
    )


class WarmExecutor(SubprocessExecutor):
    """Flower's subprocess executor, but ClientApp tasks fork from a warm fork server."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()  # pay the imports now, not at the first message
        self._running: list[multiprocessing.process.BaseProcess] = []

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        # Not a daemon: the ClientApp starts processes of its own (`client.prepare`'s decoders).
        process = self._context.Process(target=_run_task, args=(spec,), name=f"clientapp-{spec.task_id}")
        process.start()
        self._running.append(process)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished ClientApps (called by the SuperExec loop between polls)."""
        self._running = [p for p in self._running if p.is_alive()]


def run(args: argparse.Namespace) -> int:
    """`fedmammo superexec --runtime-api-address ADDRESS [--root-certificates FILE] [--parent-pid PID]`."""
    # The one change to Flower's SuperExec: its executor (it builds one with `get_executor`).
    flower_superexec.get_executor = lambda *_, **__: WarmExecutor()
    flower_superexec.run_superexec(runtime_api_address=args.runtime_api_address,
                                   insecure=args.root_certificates is None,
                                   root_certificates_path=args.root_certificates, parent_pid=args.parent_pid,
                                   runtime_dependency_install=False)
    return 0
