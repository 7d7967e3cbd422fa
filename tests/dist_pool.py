"""A pool of long-lived gloo ranks that many test cases share.

Spawning a process group costs seconds (interpreter start, ``import torch``), so each world size is
started once per test session and reused: ``pool.run(fn, *args)`` calls ``fn(*args)`` on every rank
(inside an initialised gloo group) and returns the per-rank results in rank order. ``fn`` must be a
module-level function (it is pickled by reference). An exception on any rank is re-raised here with
that rank's traceback, and every other failed rank's; a rank that does not answer within the timeout
(or within a grace period after another rank failed) fails the test instead of hanging it, and the
pool is torn down so later cases start a fresh one.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, inbox, outbox) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        job = inbox.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            outbox.put(("ok", fn(*args, **kwargs)))
        except BaseException:  # report everything, keep serving
            outbox.put(("error", traceback.format_exc()))
    dist.barrier()  # tear down together (as pm_dist.distributed.shutdown_distributed does)
    dist.destroy_process_group()


class RankError(RuntimeError):
    pass


class DistPool:
    def __init__(self, world_size: int, timeout_s: float = 300.0, grace_s: float = 20.0):
        self.world_size = world_size
        self.timeout_s, self.grace_s = timeout_s, grace_s
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.inboxes = [ctx.Queue() for _ in range(world_size)]
        self.outboxes = [ctx.Queue() for _ in range(world_size)]
        self.procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, self.inboxes[r], self.outboxes[r]),
                        daemon=True)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, fn, *args, **kwargs) -> list:
        for box in self.inboxes:
            box.put((fn, args, kwargs))
        answers = self._collect()
        errors = [f"--- rank {r} ---\n{value}" for r, (status, value) in sorted(answers.items())
                  if status == "error"]
        silent = [r for r in range(self.world_size) if r not in answers]
        if silent:  # the pool is unusable: a rank is stuck (most often in a collective)
            self.close()
            errors.append(f"rank(s) {silent} gave no answer within "
                          f"{self.grace_s if errors else self.timeout_s:.0f}s"
                          + (" of the first error (stuck in a collective the failed rank never "
                             "joined?)" if errors else ""))
        if errors:
            raise RankError("\n".join(errors))
        return [answers[r][1] for r in range(self.world_size)]

    def _collect(self) -> dict[int, tuple[str, object]]:
        """Every rank's answer; once one rank has failed, the others get ``grace_s`` more, so a
        rank that raised before a collective shows its traceback instead of the others' silence."""
        answers: dict[int, tuple[str, object]] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(answers) < self.world_size and time.monotonic() < deadline:
            for rank, box in enumerate(self.outboxes):
                if rank in answers:
                    continue
                try:
                    answers[rank] = box.get(timeout=0.05)
                except queue.Empty:
                    continue
                if answers[rank][0] == "error":
                    deadline = min(deadline, time.monotonic() + self.grace_s)
        return answers

    def close(self) -> None:
        for box, p in zip(self.inboxes, self.procs):
            if p.is_alive():
                try:
                    box.put(None)
                except Exception:
                    pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
