"""``launch/slurm.sbatch`` on a real two-node Slurm cluster built on this host
(``tests/slurm_cluster.py``), unedited, as a CPU test cluster runs it: ``sbatch --nodes=2
--gpus-per-node=0 --cpus-per-task=1``.

* a plain job across both nodes (one process per node, world size 2) finishes: exit 0, metrics of
  every step, the final checkpoint written by both ranks;
* the time limit, alongside it: the same job submitted with a real limit, ``--time=2
  --signal=B:USR1@45``. Slurm itself sends the batch script USR1 before the limit (nothing in the
  test signals the job) → every rank saves at the same step, the script requeues the job before
  the limit, the job restarts, resumes from the checkpoint saved at the signal (not the last
  periodic one) and ends with the weights and metrics of the uninterrupted job, never reaching its
  limit (no TIMEOUT, exactly one restart).

When Slurm 22.05 signals: slurmctld checks time limits every 30 s (``PERIODIC_TIMEOUT``, compiled
in; no slurm.conf option changes it) and sends ``--signal=B:USR1@N`` on the first check at most
N + 30 s before the limit, i.e. between N + 30 and N seconds before it; the limit itself is
enforced on the first check after it (``OverTimeLimit=0``), then SIGTERM, SIGKILL after
``KillWait``. ``--time`` counts whole minutes (``--time=0:30`` is a minute). With ``--time=2
--signal=B:USR1@45`` the signal arrives 45–75 s after the job starts and 60 or 90 s before it
would be killed, and the requeued piece (the same limit) has at least 45 s before its own signal,
for a start-up and 11 steps. So that the signal finds the run mid-way whatever this machine's
speed, a test plugin (written to the test's directory, loaded through ``PM_DIST_PLUGINS``; it
changes no number) holds every rank of the first piece after step ``HOLD_AT`` until the stop
file exists — the file the script creates on USR1 — and gives up after ``HOLD_S``. The plain job
is submitted once the limited one is held, so that it does not slow that job's start-up.

Skipped, with the reason, where Slurm cannot be built (not installed, not root).
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from slurm_cluster import SlurmCluster, _free_ports
from test_train import BASE

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 24, 8
ARGS = BASE + [f"run.steps={STEPS}", f"run.checkpoint_every={EVERY}", "eval.synthetic_pairs=0",
               "run.log_every=1"]
LIMIT_MIN, SIGNAL_S, CHECK_S = 2, 45, 30  # --time (minutes), --signal=B:USR1@…, slurmctld's period
HOLD_AT, HOLD_S = 13, 150  # past the periodic checkpoint of step 8, before the next (16)

HOLD_PLUGIN = '''\
"""Test-only (tests/test_slurm.py): in the first piece of a Slurm job (SLURM_RESTART_COUNT 0 or
unset), every rank waits after step $PM_DIST_TEST_HOLD_AT until $PM_DIST_STOP_FILE exists, at most
$PM_DIST_TEST_HOLD_S seconds. Changes no number of the run."""
import os
import time

AT = int(os.environ.get("PM_DIST_TEST_HOLD_AT", "0"))
if AT and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    from pm_dist.training.step import TrainStep

    _call = TrainStep.__call__

    def _held(self, *args, **kwargs):
        out = _call(self, *args, **kwargs)
        if self.step + 1 == AT:
            stop = os.environ["PM_DIST_STOP_FILE"]
            deadline = time.monotonic() + float(os.environ.get("PM_DIST_TEST_HOLD_S", "150"))
            while not os.path.exists(stop) and time.monotonic() < deadline:
                time.sleep(0.2)
        return out

    TrainStep.__call__ = _held
'''

pytestmark = pytest.mark.skipif(SlurmCluster.unavailable() is not None,
                                reason=str(SlurmCluster.unavailable()))


def _metrics(run: Path) -> list[dict]:
    if not (run / "metrics.jsonl").exists():
        return []
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in m.items() if k != "images_per_s"} for m in lines]


def _submit(cluster, tmp_path, name, port, sbatch_opts=(), env=None):
    out = tmp_path / name
    env = {"TORCHRUN": str(Path(sys.executable).parent / "torchrun"), "MASTER_PORT": str(port),
           "PM_DIST_STOP_FILE": str(tmp_path / f"stop-{name}"), "VENV": "/nonexistent",
           **(env or {})}
    job = cluster.sbatch(["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", *sbatch_opts,
                          f"--output={tmp_path}/{name}-%j.out", f"--job-name={name}",
                          "launch/slurm.sbatch", *ARGS, f"run.out_dir={out}"],
                         env=env, cwd=REPO)
    return job, out


def _log(tmp_path, name):
    return "\n".join(p.read_text(errors="replace") for p in tmp_path.glob(f"{name}-*.out"))


def _utc(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def test_sbatch_two_nodes_and_a_real_time_limit(tmp_path):
    t0 = time.monotonic()
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "slurm_hold.py").write_text(HOLD_PLUGIN)
    held = {"PM_DIST_PLUGINS": "slurm_hold", "PM_DIST_TEST_HOLD_AT": str(HOLD_AT),
            "PM_DIST_TEST_HOLD_S": str(HOLD_S), "PYTHONPATH": f"{REPO}:{plugins}"}
    done = lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",  # noqa: E731
                                           "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
    with SlurmCluster(tmp_path / "cluster") as cluster:
        p1, p2 = _free_ports(2)
        limited, lim_out = _submit(cluster, tmp_path, "limited", p2, env=held, sbatch_opts=[
            f"--time={LIMIT_MIN}", f"--signal=B:USR1@{SIGNAL_S}"])
        info = cluster.job(limited)
        assert info["TimeLimit"] == f"00:0{LIMIT_MIN}:00" and info["Requeue"] == "1", info

        # the plain job starts once the limited one is held (its start-up alone on the CPUs): it
        # runs while the limited job waits for its signal
        while not any(m.get("step", 0) >= HOLD_AT - 1 for m in _metrics(lim_out)):
            info = cluster.job(limited)
            assert info.get("JobState") in ("PENDING", "CONFIGURING", "RUNNING") \
                and "USR1" not in _log(tmp_path, "limited"), \
                (f"the signal came before the run reached step {HOLD_AT}", info,
                 _log(tmp_path, "limited")[-6000:])
            assert time.monotonic() - t0 < 120, _log(tmp_path, "limited")[-6000:]
            time.sleep(0.2)
        start = datetime.fromisoformat(cluster.job(limited)["StartTime"]).timestamp()
        held_after = time.time() - start
        plain, plain_out = _submit(cluster, tmp_path, "plain", p1)

        info = cluster.wait(plain, done, timeout_s=180)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
            (info, _log(tmp_path, "plain")[-6000:])
        info = cluster.wait(limited, lambda i: int(i.get("Restarts", 0)) >= 1 and done(i),
                            timeout_s=max(30.0, 270 - (time.monotonic() - t0)))
        log = _log(tmp_path, "limited")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-6000:])
    print(f"\n[test_slurm] held at step {HOLD_AT} {held_after:.0f} s after the job started; "
          f"jobs done {time.monotonic() - t0:.0f} s after the test started")

    # the plain job: both nodes, every step, the final checkpoint of both ranks
    head = (tmp_path / "plain-{}.out".format(plain)).read_text()
    assert "2 nodes × 1 processes" in head
    metrics = _metrics(plain_out)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    final = plain_out / "checkpoints" / f"step_{STEPS:08d}"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["world_size"] == 2 and {"head_rank0.pt", "head_rank1.pt"} <= set(meta["files"])

    # the limited job: Slurm's own USR1, within the window its time-limit check allows, before
    # the limit; requeued by the script, never timed out; exactly one restart
    pieces = re.split(r"(?m)^(?=job \d+ \(restart \d+\))", log)
    pieces = [p for p in pieces if p.startswith("job ")]
    assert [re.match(r"job \d+ \(restart (\d+)\)", p).group(1) for p in pieces] == ["0", "1"], \
        log[-6000:]
    first, second = pieces
    usr1 = [_utc(s) for s in re.findall(r"(?m)^(\S+Z) USR1 \(time limit near\)", first)]
    assert len(usr1) == 1, first[-6000:]
    # between N + 30 and N seconds before the limit (±2 s: whole seconds, the trap's delay)
    limit_s = 60 * LIMIT_MIN
    assert limit_s - SIGNAL_S - CHECK_S - 2 <= usr1[0] - start <= limit_s - SIGNAL_S + 2, \
        (usr1[0] - start, first[-3000:])
    assert "requeueing job" in first and "DUE TO TIME LIMIT" not in log, log[-6000:]
    assert "USR1" not in second, second[-3000:]
    assert int(info["Restarts"]) == 1

    # saved at the signal: the stop step is where the run was held, past the periodic checkpoint
    # of step 8 and before the next; that checkpoint is written after the stop, and the second
    # piece resumes from it
    stopped = [int(s) for s in re.findall(r"(?m)^stopping at step (\d+):", first)]
    assert stopped and stopped[0] == HOLD_AT and HOLD_AT % EVERY != 0, first[-6000:]
    ckpt = f"{lim_out}/checkpoints/step_{HOLD_AT:08d}"
    assert first.index(f"checkpoint: {ckpt}") > first.index(f"stopping at step {HOLD_AT}:"), \
        first[-6000:]
    assert f"resumed from {ckpt} at step {HOLD_AT}" in second, second[-6000:]
    assert f"step {HOLD_AT + 1}/{STEPS}" in second and f"step {HOLD_AT}/{STEPS}" not in second

    # … and ends equal to the uninterrupted job
    assert _metrics(lim_out) == metrics
    a = torch.load(plain_out / "encoder.pt", weights_only=False)
    b = torch.load(lim_out / "encoder.pt", weights_only=False)
    sa, sb = a.get("state_dict", a), b.get("state_dict", b)
    for k, v in sa.items():
        if torch.is_tensor(v):
            assert torch.equal(v, sb[k]), k
