"""Faults in real multi-process runs (``python -m pm_dist.train`` processes, faults injected by the
``tests/plugins/fault_inject.py`` plugin):

* a rank killed mid-run under ``torchrun --max-restarts=1``: the group restarts, resumes from the
  newest checkpoint (``--resume auto``) and ends with the weights, memory and metrics of a run
  never interrupted;
* a rank that raises (before the first collective, inside a step, while writing a checkpoint):
  every rank exits non-zero within a bounded time (the process group's ``dist.timeout_s``), even
  without torchrun's agent to end the others.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pm_dist.heads.memory import _STATE_TENSORS
from test_train import BASE

REPO = Path(__file__).resolve().parents[1]
ARGS = BASE + ["run.steps=10", "run.checkpoint_every=4", "eval.synthetic_pairs=0",
               "run.keep_checkpoints=5"]


def _env(**extra):
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: as the launch scripts set it (a restarted group would
    # otherwise read its predecessor's addresses from the shared store: pytorch/pytorch#135712)
    env = dict(os.environ, OMP_NUM_THREADS="1", PM_DIST_PLUGINS="fault_inject",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests" / "plugins")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "PM_DIST_TEST_FAULT", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out_dir, fault=None, restarts=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", "--monitor-interval=0.5",
           "-m", "pm_dist.train", "--resume", "auto", *ARGS, f"run.out_dir={out_dir}"]
    env = _env(**({"PM_DIST_TEST_FAULT": fault} if fault else {}))
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=240):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"no exit within {timeout}s:\n{out[-4000:]}")
    return proc.returncode, out


def _metrics(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in m.items() if k != "images_per_s"} for m in lines]


def _assert_same(a, b, where, skip=()):
    """``a`` and ``b`` equal all the way down (tensors bit for bit, the same keys in every dict)."""
    if isinstance(a, dict):
        assert isinstance(b, dict), where
        keys_a, keys_b = set(a) - set(skip), set(b) - set(skip)
        assert keys_a == keys_b, (where, sorted(map(str, keys_a ^ keys_b)))
        for k in keys_a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b), where
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_a_killed_rank_restarts_the_group_which_resumes_and_finishes(tmp_path):
    straight = _torchrun(tmp_path / "straight")
    killed = _torchrun(tmp_path / "killed", fault="kill@1:6", restarts=1)  # SIGKILL after step 6
    rc_s, out_s = _finish(straight)
    rc_k, out_k = _finish(killed)
    assert rc_s == 0, out_s[-4000:]
    assert rc_k == 0, out_k[-4000:]
    assert "resumed from" in out_k and "step_00000004 at step 4" in out_k, out_k[-4000:]
    a, b = tmp_path / "straight", tmp_path / "killed"
    ea, eb = torch.load(a / "encoder.pt", weights_only=False), torch.load(b / "encoder.pt",
                                                                          weights_only=False)
    sa = ea.get("state_dict", ea)
    sb = eb.get("state_dict", eb)
    for k, v in sa.items():
        if torch.is_tensor(v):
            assert torch.equal(v, sb[k]), k
    for r in range(2):
        last_a, last_b = a / "checkpoints/step_00000010", b / "checkpoints/step_00000010"
        ha = torch.load(last_a / f"head_rank{r}.pt", weights_only=False)
        hb = torch.load(last_b / f"head_rank{r}.pt", weights_only=False)
        # every tensor the memory saves, by its own list: a renamed or dropped one fails here
        assert set(_STATE_TENSORS) <= set(ha["head"]) and set(_STATE_TENSORS) <= set(hb["head"])
        _assert_same(ha, hb, f"head_rank{r}", skip=("checkpoint_id",))
        # the rest of the rank's state: RNG streams, buffers, the head's schedule, skipped steps
        sa = torch.load(last_a / f"state_rank{r}.pt", weights_only=False)
        sb = torch.load(last_b / f"state_rank{r}.pt", weights_only=False)
        _assert_same(sa, sb, f"state_rank{r}", skip=("checkpoint_id",))
    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in mb] == list(range(1, 11))  # every step once
    assert ma == mb


def _plain_ranks(out_dir, fault, timeout_s):
    """Two ranks started by hand (no torchrun agent to end the survivor)."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PM_DIST_TEST_FAULT=fault)
        cmd = [sys.executable, "-m", "pm_dist.train", *ARGS, f"run.out_dir={out_dir}",
               f"dist.timeout_s={timeout_s}"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.mark.parametrize("fault", ["init@1:0", "step@1:3", "save@1:4"])
def test_a_failing_rank_ends_every_rank_within_a_bounded_time(tmp_path, fault):
    timeout_s = 20
    start = time.monotonic()
    procs = _plain_ranks(tmp_path, fault, timeout_s)
    results = [_finish(p, timeout=150) for p in procs]
    took = time.monotonic() - start
    for rank, (rc, out) in enumerate(results):
        assert rc != 0, (rank, out[-3000:])
    assert "injected fault" in results[1][1], results[1][1][-3000:]
    assert took < 120, took
    if fault.startswith("save"):  # every rank hears which rank failed, and the run ends with 2
        assert all(rc == 2 for rc, _ in results), [rc for rc, _ in results]
        assert "failed on rank 1" in results[0][1]
        assert not (tmp_path / "checkpoints" / "step_00000004").exists()
