"""CUDA checks (skipped without a GPU): the head on the GPU against the CPU, and an NCCL run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pm_dist.heads.margin import Margin
from pm_dist.heads.memory import PrototypeMemory
from pm_dist.heads.memory_config import MemoryConfig
from pm_dist.heads.softmax import sharded_margin_softmax

pytestmark = pytest.mark.cuda


def _softmax_step(device, dtype, emb, weight, labels):
    # clone: on the CPU in fp32 ``.to`` returns the caller's tensor itself, and marking it as
    # requiring grad would make the next call's copy a non-leaf
    e = emb.to(device, dtype).clone().requires_grad_(True)
    w = weight.to(device, dtype).clone().requires_grad_(True)
    res = sharded_margin_softmax(e, w, labels.to(device), Margin(s=64, m1=1, m2=0.5, m3=0),
                                 hardest_ids=True)
    res.loss.backward()
    return res.loss.item(), e.grad.float().cpu(), w.grad.float().cpu(), res.hardest_id.cpu()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_softmax_on_cuda_matches_cpu(dtype, tol):
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(256, 128, generator=g))
    weight = F.normalize(torch.randn(4096, 128, generator=g))
    labels = torch.randint(0, 4096, (256,), generator=g)
    cpu = _softmax_step("cpu", torch.float32, emb, weight, labels)
    gpu = _softmax_step("cuda", dtype, emb, weight, labels)
    assert gpu[0] == pytest.approx(cpu[0], rel=tol)
    for a, b in zip(gpu[1:3], cpu[1:3]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
    if dtype == torch.float32:
        assert torch.equal(gpu[3], cpu[3])


def test_memory_head_on_cuda_matches_cpu():
    cfg = MemoryConfig(capacity=64, num_classes=200)
    heads = {d: PrototypeMemory(32, cfg, Margin(), classes_per_batch=16, device=d)
             for d in ("cpu", "cuda")}
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        labels = torch.randint(0, 200, (16,), generator=g).repeat_interleave(2)
        emb = torch.randn(32, 32, generator=g)
        out = {d: heads[d](emb.to(d), labels.to(d)) for d in heads}
        assert out["cuda"].loss.item() == pytest.approx(out["cpu"].loss.item(), rel=1e-4)
    assert torch.equal(heads["cuda"].slot_class.cpu(), heads["cpu"].slot_class)
    torch.testing.assert_close(heads["cuda"].protos.cpu(), heads["cpu"].protos, rtol=1e-4, atol=1e-5)


def test_nccl_training_smoke(tmp_path):
    """torchrun, one GPU, NCCL, bf16: trains, evaluates, writes its outputs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "pm_dist.train", f"run.out_dir={tmp_path}", "run.steps=40", "run.progress=false",
           "run.log_every=10", "deepspeed.precision=bf16", "data.num_workers=2",
           "eval.synthetic_pairs=300"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "final synthetic-pairs: accuracy" in proc.stdout
    info = (tmp_path / "environment.json").read_text()
    assert '"backend": "nccl"' in info
    assert (tmp_path / "encoder.pt").exists()
