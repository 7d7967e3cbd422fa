"""A pool of long-lived gloo ranks that many test cases share.

Spawning a process group costs seconds (interpreter start, ``import torch``), so each world size is
started once per test session and reused: ``pool.run(fn, *args)`` calls ``fn(*args)`` on every rank
(inside an initialised gloo group) and returns the per-rank results in rank order. ``fn`` must be a
module-level function (it is pickled by reference). An exception on any rank is re-raised here with
that rank's traceback; a rank that does not answer within the timeout fails the test instead of
hanging it, and the pool is torn down so later cases start a fresh one.
"""

from __future__ import annotations

import os
import socket
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
    dist.destroy_process_group()


class RankError(RuntimeError):
    pass


class DistPool:
    def __init__(self, world_size: int, timeout_s: float = 300.0):
        self.world_size = world_size
        self.timeout_s = timeout_s
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
        results, errors = [], []
        for rank, box in enumerate(self.outboxes):
            try:
                status, value = box.get(timeout=self.timeout_s)
            except Exception:
                self.close()
                raise RankError(f"rank {rank} gave no answer within {self.timeout_s}s") from None
            if status == "error":
                errors.append(f"--- rank {rank} ---\n{value}")
            results.append(value)
        if errors:
            raise RankError("\n".join(errors))
        return results

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
