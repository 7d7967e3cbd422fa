"""Margin softmax cross-entropy over class-sharded columns (the core every head shares).

Every rank holds the *same* global batch of normalized embeddings E [N, D] and its *own* columns
W_r [C_r, D] (class weights or prototypes). Rank r computes cosines E·W_rᵀ for its columns only; the
softmax over all Σ C_r columns is assembled with two small collectives over [N]-sized vectors (a
third only when asked) and never materialises a full row of logits anywhere:

1. all-reduce(MAX) of [row max of the scaled logits, hardest non-target cosine]   (2·N floats)
2. all-reduce(SUM) of [Σ_{non-target} exp(logit − max), target cosine, target count] (3·N floats)
3. only with ``hardest_ids=True``: all-reduce(MAX) of the hardest non-target's column id (N int64)

The third exists only for doppelganger mining (the identity of the hardest negative); loss,
accuracy, the hardest non-target cosine and the gradients need the first two. All reductions are fp32, whatever the matmul dtype, and
the loss is log-sum-exp − target (never ``log(clamp(p))``), computed from the non-target mass so a
confident row's small loss and its gradient p_t − 1 keep their precision.

The backward is local: d loss / d logits_r = s·(p − onehot)/N on rank r's columns (the margin's true
derivative on the target column), then d E = dlogits_r·W_r and d W_r = dlogits_rᵀ·E. The buffer is
not rescaled: dlogits_r = diag(f)·exp(logit − max) plus the target entries, so the per-row factor f
multiplies the [N, D] result (d E) or operand (E, for d W_r) and the target column enters as a
rank-one correction; the backward is the products and nothing else over [N, C_r]. d E is a partial
sum that the caller's all-gather backward (``distributed.gather_embeddings``) reduce-scatters to the
owners of the rows. d W_r is already the exact gradient of the global mean loss: nothing averages it.

Passes over the [N, C_r] buffer besides the products: the row max (a max-with-index only when
``hardest_ids``), one fused scale-and-shift, the exp and the row sum; a column mask costs one more
pass only when some column is masked (an empty memory slot).

Memory: one fp32 buffer [N, C_r] holds the cosines, then exp(logit − max) in place, which the
backward reads as it is. Peak per rank ≈ 4·N·C_r bytes (+ 2·N·C_r transient when the matmul runs in
bf16/fp16) + O(N·D + C_r·D) for the outputs. The buffer is freed after backward, so a graph built by
this function can be backpropagated once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pm_dist.distributed import all_reduce_
from pm_dist.heads.margin import Margin

_NEG_INF = float("-inf")


@dataclass
class SoftmaxResult:
    """What one softmax pass returns; identical on every rank."""

    loss: torch.Tensor  # scalar, global-batch mean, differentiable
    accuracy: torch.Tensor  # scalar, top-1 over all columns of the raw cosines (no margin)
    hardest_id: torch.Tensor | None  # [N] int64: id of the hardest non-target column, −1 if none
    #                                  (None unless asked for with ``hardest_ids=True``)
    hardest_cos: torch.Tensor  # [N] cosine to it (−inf if none)
    target_cos: torch.Tensor  # [N] cosine to the target column


class _ShardedMarginSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings, weight, local_target, column_mask, column_ids, target_vectors,
                margin: Margin, group, hardest_ids: bool):
        n, c = embeddings.shape[0], weight.shape[0]
        device = embeddings.device
        buf = torch.mm(embeddings.to(weight.dtype), weight.t()).float()  # cosines [N, C]

        owned_rows = (local_target >= 0).nonzero().squeeze(1)
        owned_cols = local_target[owned_rows]
        if target_vectors is None:
            cos_t_local = buf[owned_rows, owned_cols]
        else:  # the row's own target vector replaces its class column (leave-one-out prototypes)
            tv = target_vectors[owned_rows]
            cos_t_local = (embeddings[owned_rows].to(tv.dtype) * tv).sum(1).float()
        if column_mask is not None and not bool(column_mask.all()):  # a full memory: no pass
            buf.masked_fill_(~column_mask.unsqueeze(0), _NEG_INF)
        buf[owned_rows, owned_cols] = _NEG_INF  # the target is no candidate for "hardest"
        hard_col = None
        if c == 0:
            hard_cos_local = torch.full((n,), _NEG_INF, device=device)
        elif hardest_ids:
            hard_cos_local, hard_col = buf.max(dim=1)
        else:  # no column index wanted: a plain max is several times cheaper than max-with-index
            hard_cos_local = buf.amax(dim=1)
        t_logit_owned, _ = margin.target_logit(cos_t_local)

        # 1. MAX: row max (stability) and the global hardest non-target cosine.
        row_max = margin.s * hard_cos_local
        row_max[owned_rows] = torch.maximum(row_max[owned_rows], t_logit_owned)
        maxes = all_reduce_(torch.stack([row_max, hard_cos_local]), dist.ReduceOp.MAX, group)
        row_max, hard_cos = maxes[0], maxes[1]
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))

        # exp(s·cos − max) in two passes: one fused scale-and-shift, one exp (the target entry
        # stays −inf → 0, so the sum below is over non-targets and the buffer needs no mask later)
        if c > 0:
            torch.add(row_max.neg().unsqueeze(1), buf, alpha=margin.s, out=buf)
            buf.exp_()

        # 2. SUM: non-target mass, target cosine (only its owner contributes) and owner count.
        sums = torch.zeros(3, n, device=device)
        if c > 0:
            torch.sum(buf, dim=1, out=sums[0])
        sums[1, owned_rows] = cos_t_local
        sums[2, owned_rows] = 1.0
        all_reduce_(sums, dist.ReduceOp.SUM, group)
        other_exp, target_cos, owners = sums[0], sums[1], sums[2]
        if not bool((owners == 1).all()):
            bad = (owners != 1).nonzero().squeeze(1)[:8].tolist()
            raise ValueError(f"rows {bad} have {owners[bad].tolist()} target columns across ranks; "
                             "every row needs exactly one (is its class in no shard, or in two?)")
        target_logit, target_deriv = margin.target_logit(target_cos)
        sum_exp = other_exp + torch.exp(target_logit - row_max)
        # log Σ_j e^{z_j} − z_t = softplus(log Σ_{j≠t} e^{z_j} − z_t): exact to the last bit even
        # when the target dominates (a loss of 1e-8 stays 1e-8, where log(sum) − z_t would be 0).
        loss = F.softplus(torch.log(other_exp) + row_max - target_logit).mean()

        # 3. MAX, only when asked: the id of the hardest non-target column (its holder reports it).
        hard_id = None
        if hardest_ids:
            if column_ids is None:
                column_ids = torch.arange(c, device=device)
            holder = (hard_cos_local == hard_cos) & torch.isfinite(hard_cos)
            hard_id = torch.full((n,), -1, dtype=torch.int64, device=device)
            if c > 0:
                hard_id = torch.where(holder, column_ids[hard_col], hard_id)
            all_reduce_(hard_id, dist.ReduceOp.MAX, group)

        accuracy = (target_cos > hard_cos).float().mean()

        ctx.buffer = buf
        ctx.margin = margin
        ctx.save_for_backward(embeddings, weight, owned_rows, owned_cols, sum_exp, other_exp,
                              target_deriv, target_vectors)
        outputs = (loss, accuracy, hard_cos, target_cos) + ((hard_id,) if hardest_ids else ())
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if not hasattr(ctx, "buffer"):
            raise RuntimeError("sharded margin softmax: backward ran twice; its buffer is reused in "
                               "place and freed after the first backward")
        buf = ctx.buffer
        del ctx.buffer
        (embeddings, weight, owned_rows, owned_cols, sum_exp, other_exp, target_deriv,
         target_vectors) = ctx.saved_tensors
        n = embeddings.shape[0]
        scale = grad_loss.float() / n

        # p = exp(logit − max) / Σ; d loss/d cos_j = s·p_j·scale off target, deriv·(p_t − 1)·scale on
        # it, with p_t − 1 = −Σ_{j≠t} p_j (no cancellation when p_t ≈ 1). The buffer holds
        # exp(logit − max), 0 on the target: the per-row factor s·scale/Σ is applied to the [N, D]
        # operands and results instead of the [N, C] buffer (dlogits = diag(f)·buf + target terms),
        # and the target column's term is added as a rank-one correction.
        f = (ctx.margin.s * scale / sum_exp).unsqueeze(1)
        grad_t = (-(other_exp / sum_exp) * target_deriv * scale)[owned_rows]

        grad_e = grad_w = None
        dcos = buf.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_e = torch.mm(dcos, weight).float().mul_(f)
            if target_vectors is not None:
                grad_e[owned_rows] += grad_t.unsqueeze(1) * target_vectors[owned_rows].to(grad_e.dtype)
            else:
                grad_e[owned_rows] += grad_t.unsqueeze(1) * weight[owned_cols].to(grad_e.dtype)
            grad_e = grad_e.to(embeddings.dtype)
        if ctx.needs_input_grad[1]:
            scaled = (embeddings.float() * f).to(weight.dtype)
            grad_w = torch.mm(dcos.t(), scaled)
            if target_vectors is None and owned_rows.numel():
                rows = grad_t.unsqueeze(1) * embeddings[owned_rows].float()
                grad_w.index_add_(0, owned_cols, rows.to(grad_w.dtype))
        return grad_e, grad_w, None, None, None, None, None, None, None


def sharded_margin_softmax(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    local_target: torch.Tensor,
    margin: Margin,
    *,
    column_mask: torch.Tensor | None = None,
    column_ids: torch.Tensor | None = None,
    target_vectors: torch.Tensor | None = None,
    group=None,
    hardest_ids: bool = False,
) -> SoftmaxResult:
    """Cross-entropy of the global batch over columns sharded across the ranks of ``group``.

    Args:
        embeddings: [N, D] L2-normalized global batch, the same on every rank.
        weight: [C_r, D] L2-normalized columns of this rank (C_r may be 0). Its dtype is the matmul
            dtype; everything after the matmul is fp32.
        local_target: [N] int64, the column in *this* shard holding the row's target, or −1 when the
            target lives on another rank. Across ranks every row must have exactly one target.
        margin: the margin applied to the target logit.
        column_mask: [C_r] bool, False for columns that take no part (empty memory slots).
        column_ids: [C_r] int64 global ids reported for the hardest non-target (default: local
            column index; pass class ids).
        target_vectors: [N, D] optional, normalized; where given, row i's target cosine is
            E_i·target_vectors_i instead of E_i·W[local_target_i] (leave-one-out prototypes). Read
            only on rows this rank owns; takes no gradient.
        group: the process group the columns are sharded over (default: the world).
        hardest_ids: also report the id of each row's hardest non-target column
            (``SoftmaxResult.hardest_id``; doppelganger mining). It costs a third all-reduce (N
            int64) and a max-with-index pass over the [N, C_r] logits instead of a plain max; off
            (the default), the step issues exactly two all-reduces and ``hardest_id`` is None.
    """
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(f"embeddings {tuple(embeddings.shape)} and weight {tuple(weight.shape)} "
                         "must be [N, D] and [C, D]")
    if embeddings.shape[0] == 0:
        raise ValueError("the global batch is empty")
    if local_target.shape != (embeddings.shape[0],):
        raise ValueError(f"local_target must be [N]={embeddings.shape[0]}, got {tuple(local_target.shape)}")
    if target_vectors is not None:
        target_vectors = target_vectors.detach()
    out = _ShardedMarginSoftmax.apply(embeddings, weight, local_target.long(), column_mask,
                                      column_ids, target_vectors, margin, group, bool(hardest_ids))
    loss, accuracy, hard_cos, target_cos = out[:4]
    return SoftmaxResult(loss, accuracy, out[4] if hardest_ids else None, hard_cos, target_cos)
