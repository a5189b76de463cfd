"""Test helpers for child processes: the model of a run directory, and torchrun commands that cannot collide.

Several test sessions may run at once on one machine (pytest in two checkouts, CI beside a developer): a
fixed rendezvous port such as ``--master_port 29531`` then fails one of them ("address already in use") or,
worse, lets ranks of two different tests meet. Launch every multi-rank child through :func:`torchrun_cmd`;
use :func:`free_port` only where something other than torchrun needs a port.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def load_model(path: str | Path, **kw):
    """The moeut model of a run directory or checkpoint file, on the CPU (``moeut.run.load_run``)."""
    from moeut.run import load_run  # here, so that importing this module for torchrun_cmd stays cheap

    return load_run(path, device="cpu", require_tokenizer=False, **kw).model


def torchrun_cmd(nproc: int, *program: str) -> list[str]:
    """The argv that runs ``program`` on ``nproc`` local ranks under torchrun, on a port nobody else holds.

    ``program`` is what follows torchrun's own options: a script and its arguments
    (``torchrun_cmd(2, "tests/train/child.py", "--flag")``) or a module (``torchrun_cmd(2, "-m", "moeut.cli",
    "train", ...)``). Pass the result to ``subprocess.run``/``Popen`` with the environment the ranks need
    (``PYTHONPATH`` holding src/ and the repository root when they import ``tests``; ``OMP_NUM_THREADS``).

    How the port is chosen: ``--standalone`` makes torchrun start its c10d rendezvous store on
    ``localhost:0``, so the kernel hands it a free port while binding it (no window between choosing and
    binding, unlike :func:`free_port`), and the ranks' ``init_process_group`` (``MASTER_ADDR``/``MASTER_PORT``,
    set by torchrun) reuse that same store. Each launch also gets its own random rendezvous id. Nothing else
    is needed from the caller; do not add ``--master-port`` or ``--rdzv-*`` options (with ``--standalone``
    torchrun ignores them). Inside a rank ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are set as usual, so
    ``moeut.train.distributed.init_distributed`` works unchanged.
    """
    if nproc < 1:
        raise ValueError(f"torchrun_cmd needs nproc >= 1, got {nproc}")
    if not program:
        raise ValueError("torchrun_cmd needs a program: a script path or '-m', 'module', then its arguments")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), *program]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (bound with port 0, read back, released).

    For a child that needs ``MASTER_PORT`` without torchrun (``torch.multiprocessing.spawn`` with ``env://``,
    a hand-made ``TCPStore``). Another process may still take the port between this call and the child's
    bind, so prefer :func:`torchrun_cmd`, or a ``TCPStore(host, 0, is_master=True)`` whose ``.port`` the
    children are given, where the code allows it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
