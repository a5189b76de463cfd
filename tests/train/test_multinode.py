"""The multi-node recipe of docs/training.md, on one machine: two `torchrun --nnodes 2 --nproc_per_node 1`
launchers meeting at a c10d rendezvous train exactly as one launcher with two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_helpers import free_port, torchrun_cmd
from tests.train.conftest import train_args

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in line]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_train_as_one_node_with_two_processes(tiny_data, tmp_path):
    args = lambda out: train_args(tiny_data, out, steps=4, eval_every=0, save_every=4)  # noqa: E731
    one_node = tmp_path / "one-node"
    res = subprocess.run(torchrun_cmd(2, "-m", "moeut.cli", *args(one_node)), env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    two_nodes = tmp_path / "two-nodes"
    endpoint = f"localhost:{free_port()}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "moeut-two-nodes",
                "-m", "moeut.cli", *args(two_nodes)]
    nodes = [subprocess.Popen(launcher, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert len(_losses(one_node)) == 4
    assert _losses(two_nodes) == _losses(one_node)  # the same ranks, data and reductions: the same bits
