"""Stopping when asked: a signal on one rank or the stop file stops every rank after the same step,
with a checkpoint, no final evaluation or export, and exit status 75; the resumed run ends where
an uninterrupted one does."""

from __future__ import annotations

import os
import signal

import torch

from pm_dist.config import load_config
from pm_dist.distributed import get_rank, init_distributed
from pm_dist.preemption import EXIT_PREEMPTED, STOP_FILE_ENV, Stopper
from pm_dist.train import Trainer
from test_train import BASE

EXTRA = ["run.steps=10", "run.checkpoint_every=4", "eval.synthetic_pairs=200"]


def test_signal_and_stop_file_single_process(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGUSR1)
    with Stopper(stop_file=tmp_path / "STOP") as stopper:
        assert not stopper.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stopper.should_stop() and stopper.reason == "received SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers restored
    monkeypatch.setenv(STOP_FILE_ENV, str(tmp_path / "STOP"))
    with Stopper() as stopper:
        assert not stopper.should_stop()
        (tmp_path / "STOP").touch()
        assert stopper.should_stop() and "stop file" in stopper.reason
    assert EXIT_PREEMPTED == 75


def _train(out_dir, overrides, resume="none", signal_rank=None, signal_after=None, stop_file=None):
    if stop_file:
        os.environ[STOP_FILE_ENV] = stop_file
    try:
        cfg = load_config(None, BASE + [f"run.out_dir={out_dir}"] + EXTRA + overrides)
        trainer = Trainer(cfg, init_distributed(), resume=resume, record_history=True)
        if signal_rank == get_rank():
            inner = trainer.train_step

            class Signalling:  # the trainer calls it and sets .step before each call
                def __call__(self, *args):
                    out = inner(*args)
                    if inner.step + 1 == signal_after:
                        os.kill(os.getpid(), signal.SIGUSR1)
                    return out

                def __setattr__(self, name, value):
                    setattr(inner, name, value)

                def __getattr__(self, name):
                    return getattr(inner, name)

            trainer.train_step = Signalling()
        result = trainer.fit()
    finally:
        os.environ.pop(STOP_FILE_ENV, None)
    return dict(result=result, losses=[h["loss"] for h in trainer.history],
                weights={k: v.clone() for k, v in trainer.engine.module.state_dict().items()},
                head=trainer.head.shard_state())


def test_a_signal_on_one_rank_stops_every_rank_with_a_checkpoint(dist_pool, tmp_path):
    pool = dist_pool(2)
    full = pool.run(_train, str(tmp_path / "full"), [])
    run = str(tmp_path / "run")
    stopped = pool.run(_train, run, [], "none", 1, 6)  # SIGUSR1 on rank 1 after step 6
    for r in stopped:
        assert r["result"]["step"] == 6 and r["result"]["eval"] == []
    assert stopped[0]["result"]["preempted"] == "another rank was asked to stop"
    assert stopped[1]["result"]["preempted"] == "received SIGUSR1"
    assert os.path.isdir(os.path.join(run, "checkpoints", "step_00000006"))
    assert not os.path.exists(os.path.join(run, "encoder.pt"))  # no export when stopped
    resumed = pool.run(_train, run, [], "auto")
    for f, s, r in zip(full, stopped, resumed):
        assert s["losses"] + r["losses"] == f["losses"]
        assert r["result"]["preempted"] is None and r["result"]["step"] == 10
        for k, v in f["weights"].items():
            assert torch.equal(v, r["weights"][k]), k
        assert torch.equal(f["head"]["protos"], r["head"]["protos"])
    assert os.path.exists(os.path.join(run, "encoder.pt"))


def test_stop_file_stops_at_once_without_a_new_checkpoint(dist_pool, tmp_path):
    stop = tmp_path / "STOP"
    stop.touch()
    results = dist_pool(2).run(_train, str(tmp_path), [], "none", None, None, str(stop))
    assert all(r["result"]["step"] == 0 and r["result"]["preempted"] for r in results)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_exit_codes_of_the_command(tmp_path):
    """75: stopped (here by a stop file present from the start); 2: a checkpoint error, one line."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    stop = tmp_path / "STOP"
    stop.touch()
    bad = tmp_path / "bad" / "checkpoints" / "step_00000004"
    bad.mkdir(parents=True)  # no meta.json: nothing verifies
    metrics = tmp_path / "bad" / "metrics.jsonl"  # the earlier run's record, kept on refusal
    metrics.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    events = tmp_path / "bad" / "tensorboard" / "events.out.tfevents.0.host"
    events.parent.mkdir()
    events.write_bytes(b"earlier events")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (metrics, events)}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "pm_dist.train", *BASE, "run.steps=2", "eval.synthetic_pairs=0"]
    stopped = subprocess.Popen(args + [f"run.out_dir={tmp_path / 'run'}"],
                               env=dict(env, **{STOP_FILE_ENV: str(stop)}), cwd=repo,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    refused = subprocess.Popen(args + [f"run.out_dir={tmp_path / 'bad'}", "--resume", "auto"],
                               env=env, cwd=repo, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    out_s, _ = stopped.communicate(timeout=180)
    out_r, _ = refused.communicate(timeout=180)
    assert stopped.returncode == EXIT_PREEMPTED, out_s[-3000:]
    assert "stopped at step 0" in out_s
    assert refused.returncode == 2, out_r[-3000:]
    assert "checkpoint error: --resume auto:" in out_r and "auto-or-fresh" in out_r
    assert bad.is_dir()  # refused: nothing moved, truncated or purged
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    assert sorted(events.parent.iterdir()) == [events]


def test_sigterm_to_every_process_saves_even_with_loader_workers(tmp_path):
    """What Slurm does at preemption: SIGTERM to every process of the job, DataLoader workers
    included. The workers survive it (they inherit the trainer's handler), the trainer saves at
    the next step and exits 75."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    args = [sys.executable, "-m", "pm_dist.train", *BASE, "run.steps=2000", "data.num_workers=2",
            "eval.synthetic_pairs=0", "run.log_every=1", f"run.out_dir={run}"]
    proc = subprocess.Popen(args, env=env, cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists()
                   and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "received SIGTERM" in out
    saved = sorted((run / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and int(saved[0].name[5:]) >= 3
