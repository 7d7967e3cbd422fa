"""``launch/slurm.sbatch`` on a real two-node Slurm cluster built on this host
(``tests/slurm_cluster.py``), unedited, as a CPU test cluster runs it: ``sbatch --nodes=2
--gpus-per-node=0 --cpus-per-task=1``.

* a plain job across both nodes (one process per node, world size 2) finishes: exit 0, metrics of
  every step, the final checkpoint written by both ranks;
* the requeue path, alongside it: USR1 to the batch script (what ``--signal=B:USR1@…`` delivers
  near the time limit) while it trains → every rank saves at the same step, the script requeues
  the job, the job restarts, resumes from that checkpoint and ends with the weights and metrics of
  the uninterrupted job.

Skipped, with the reason, where Slurm cannot be built (not installed, not root).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slurm_cluster import SlurmCluster, _free_ports
from test_train import BASE

REPO = Path(__file__).resolve().parents[1]
ARGS = BASE + ["run.steps=24", "run.checkpoint_every=8", "eval.synthetic_pairs=0",
               "run.log_every=1"]

pytestmark = pytest.mark.skipif(SlurmCluster.unavailable() is not None,
                                reason=str(SlurmCluster.unavailable()))


def _metrics(run: Path) -> list[dict]:
    if not (run / "metrics.jsonl").exists():
        return []
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in m.items() if k != "images_per_s"} for m in lines]


def _submit(cluster, tmp_path, name, port):
    out = tmp_path / name
    env = {"TORCHRUN": str(Path(sys.executable).parent / "torchrun"), "MASTER_PORT": str(port),
           "PM_DIST_STOP_FILE": str(tmp_path / f"stop-{name}"), "VENV": "/nonexistent"}
    job = cluster.sbatch(["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
                          f"--output={tmp_path}/{name}-%j.out", f"--job-name={name}",
                          "launch/slurm.sbatch", *ARGS, f"run.out_dir={out}"],
                         env=env, cwd=REPO)
    return job, out


def _log(tmp_path, name):
    return "\n".join(p.read_text(errors="replace") for p in tmp_path.glob(f"{name}-*.out"))


def test_sbatch_two_nodes_and_the_requeue_path(tmp_path):
    cluster_dir = tmp_path / "cluster"
    with SlurmCluster(cluster_dir) as cluster:
        p1, p2 = _free_ports(2)
        plain, plain_out = _submit(cluster, tmp_path, "plain", p1)
        requeued, req_out = _submit(cluster, tmp_path, "requeued", p2)

        # the requeue path: USR1 to the batch shell once the job trains (step ≥ 3)
        deadline = time.monotonic() + 120
        while not any(m.get("step", 0) >= 3 for m in _metrics(req_out)):
            info = cluster.job(requeued)
            assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
                (info, _log(tmp_path, "requeued"))
            assert time.monotonic() < deadline, _log(tmp_path, "requeued")
            time.sleep(0.2)
        subprocess.run(["scancel", "--batch", "--signal=USR1", str(requeued)], env=cluster.env,
                       check=True)

        done = lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",  # noqa: E731
                                               "NODE_FAIL", "OUT_OF_MEMORY")
        info = cluster.wait(plain, done, timeout_s=150)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
            (info, _log(tmp_path, "plain")[-6000:])
        info = cluster.wait(requeued, lambda i: int(i.get("Restarts", 0)) >= 1 and done(i),
                            timeout_s=150)
        log = _log(tmp_path, "requeued")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-6000:])

    # the plain job: both nodes, every step, the final checkpoint of both ranks
    head = (tmp_path / "plain-{}.out".format(plain)).read_text()
    assert "2 nodes × 1 processes" in head
    metrics = _metrics(plain_out)
    assert [m["step"] for m in metrics] == list(range(1, 25))
    final = plain_out / "checkpoints" / "step_00000024"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["world_size"] == 2 and {"head_rank0.pt", "head_rank1.pt"} <= set(meta["files"])

    # the requeued job: stopped with a checkpoint at the signal, restarted, resumed, equal
    stopped = [line for line in log.splitlines() if line.startswith("stopping at step")]
    assert stopped and "requeueing job" in log, log[-6000:]
    stop_step = int(stopped[0].split()[3].rstrip(":"))
    assert f"resumed from {req_out}/checkpoints/step_{stop_step:08d} at step {stop_step}" in log, log[-6000:]
    assert int(info["Restarts"]) == 1
    assert _metrics(req_out) == metrics
    a = torch.load(plain_out / "encoder.pt", weights_only=False)
    b = torch.load(req_out / "encoder.pt", weights_only=False)
    sa, sb = a.get("state_dict", a), b.get("state_dict", b)
    for k, v in sa.items():
        if torch.is_tensor(v):
            assert torch.equal(v, sb[k]), k
