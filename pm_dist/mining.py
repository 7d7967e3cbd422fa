"""Doppelganger mining: each identity's current look-alike, and batches that put look-alikes together.

The softmax already finds, for every row of the global batch, its hardest non-target column: the
class whose weight or prototype is closest to the row's embedding (``HeadOutput.hardest_class`` and
``hardest_cos``, reported when ``head.report_hardest`` is on). The miner keeps the result per
identity in a ``DoppelgangerTable`` and the sampler draws a share of each batch as the doppelgangers
of the identities it drew at random, so the softmax sees its hardest negatives side by side.
No extra pass over the memory or the weights: the table is fed from values the loss computes anyway.

**The table** (replicated: every rank holds all of it and makes the same updates, because every rank
sees the same global batch and the same all-reduced hardest negatives; no collective is added):

    partner  int32   the identity's doppelganger, −1 when it has none yet
    cos      fp16    the cosine at which it was last seen (set or confirmed)
    age      uint8   the identity's batch appearances since then without confirming it

7 bytes per identity: 7 MB at 10⁶ identities, 700 MB at 10⁸ (in host memory, on every rank).

**Update rule**, after step t, for every class c of the batch: its candidate d is the hardest
non-target over its rows (largest cosine; ties: smallest class id; rows with no finite hardest
negative are ignored). Then

* no entry yet → partner = d;
* d is the partner already → confirmed: cos refreshed, age = 0;
* d is harder than the stored cosine (compared in fp16) → replaced;
* the entry has been seen ``patience`` times without confirmation (age ≥ patience) → replaced by d;
* otherwise age += 1 (saturating at 255).

Setting, confirming or replacing resets age to 0. Age counts the class's own appearances, not
global steps: ageing every identity each step would cost O(N) per step.

**Mined batches do not confirm themselves.** When c's partner p is in the batch *because the
sampler mined it for c*, p's prototype (or weight row) is as fresh as c's, while the other
candidates' may be stale; p then tends to come out hardest whatever the truth, and the table would
lock in its first guess (measured: planted twins recovered 7 % with self-confirmation, against 22 %
from random batches). So for such a class, p being hardest is no confirmation: the age grows; a
*different*, harder candidate still replaces p; and when the age passes ``patience`` with p still
the hardest, the entry is cleared (−1), so c's next appearance — drawn at random, with no partner
mined for it — measures its doppelganger afresh. A step that is skipped (a
non-finite loss or gradient on some rank) changes nothing.

**Sampling**, step t: the sampler draws (1 − f)·P identities at random, then asks the miner for the
doppelgangers of those, in draw order: identities without one, doppelgangers already in the batch
(duplicates) and doppelgangers with fewer than ``min_images`` images are skipped; the sampler fills
any shortfall at random (so at most min(f, 1 − f)·P identities are mined). The table read for batch
t is the table **as of step t − delay** (after steps 0 … t − delay − 1): the loader plans batches
ahead (``num_workers × prefetch_factor``), so a plan must not depend on when it was made. ``delay``
must be at least that look-ahead (checked); the table keeps the partners it changed in the last
``delay`` steps to answer for the older state. A batch is therefore a function of (seed, t, the
table's history), identical on every rank and on resume.

What "hardest" means per head: Prototype Memory — the closest prototype in memory (the memory holds
the most recently seen classes, so a doppelganger is found among them); Full FC — the closest class
weight over all classes; Partial FC — the closest among the columns sampled that step only (the
batch's positives and a random share of the rest).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pm_dist.data.sampler import MIN_IMAGES

FORMAT = "pm_dist.doppelgangers/1"
BYTES_PER_IDENTITY = 4 + 2 + 1  # partner int32, cos fp16, age uint8
_AGE_MAX = 255


@dataclass
class MiningConfig:
    """The ``mining`` section of a run config (docs/mining.md)."""

    enabled: bool = False
    # f: share of each batch's identities that are doppelgangers of the rest (mined share ≤ min(f,
    # 1 − f)); 0.5: no fraction measured better, none helped accuracy (docs/mining.md, Measured)
    fraction: float = 0.5
    patience: int = 8  # unconfirmed appearances before an entry may be replaced by a softer one
    delay: int = 4  # batch t reads the table as of step t − delay; ≥ loader look-ahead
    min_images: int = 2  # doppelgangers with fewer images are not proposed

    def validate(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"mining.fraction must be in [0, 1], got {self.fraction}")
        if not 0 <= self.patience <= _AGE_MAX:
            raise ValueError(f"mining.patience must be in [0, {_AGE_MAX}] (an 8-bit age), "
                             f"got {self.patience}")
        if self.delay < 0:
            raise ValueError(f"mining.delay must be ≥ 0, got {self.delay}")
        if self.min_images < MIN_IMAGES:  # the sampler never draws an identity with fewer
            raise ValueError(f"mining.min_images must be ≥ {MIN_IMAGES} (an identity with fewer "
                             f"images is never drawn into a batch), got {self.min_images}")

    def check_lookahead(self, lookahead: int) -> None:
        """A batch may be planned ``lookahead`` steps before it is trained on."""
        if self.enabled and self.delay < lookahead:
            raise ValueError(
                f"mining.delay={self.delay} is smaller than the loader's look-ahead of {lookahead} "
                f"batches (data.num_workers × data.prefetch_factor): a batch would be planned "
                f"from a table that depends on timing. Set mining.delay ≥ {lookahead}.")


class DoppelgangerTable:
    """Per identity: partner (int32, −1 none), cos (fp16), age (uint8). See the module docstring.

    ``steps``: steps observed so far (the table is the state after steps 0 … steps − 1).
    ``history``: how many past steps ``partners(..., as_of=...)`` can look back.
    """

    def __init__(self, num_classes: int, patience: int = 8, history: int = 0):
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        self.num_classes, self.patience = int(num_classes), int(patience)
        self.history = int(history)
        self.partner = np.full(self.num_classes, -1, np.int32)
        self.cos = np.zeros(self.num_classes, np.float16)
        self.age = np.zeros(self.num_classes, np.uint8)
        self.steps = 0
        self.entries = 0  # identities with a partner (kept up to date, never counted by a scan)
        # (step, classes whose partner changed (sorted), their partner before that step)
        self._log: deque = deque(maxlen=max(self.history, 1))

    @property
    def nbytes(self) -> int:
        return self.partner.nbytes + self.cos.nbytes + self.age.nbytes

    # ------------------------------------------------------------------------------- update
    def update(self, step: int, labels=None, hardest_class=None, hardest_cos=None,
               mined_for=None) -> dict:
        """Observe step ``step`` (must be ``self.steps``); labels None: a skipped step (no change).
        ``mined_for``: classes whose partner the sampler put into this batch; their partner being
        hardest is no confirmation (see the module docstring). Returns counts: classes seen,
        entries set, confirmed, replaced, cleared."""
        if step != self.steps:
            raise RuntimeError(f"doppelganger table: observed step {step}, expected {self.steps}")
        self.steps += 1
        counts = dict(seen=0, new=0, confirmed=0, replaced=0, cleared=0)
        if labels is None:
            self._log.append((step, np.zeros(0, np.int64), np.zeros(0, np.int32)))
            return counts
        classes, cand, cand_cos = hardest_per_class(labels, hardest_class, hardest_cos)
        cur, cur_cos, age = self.partner[classes], self.cos[classes], self.age[classes]
        same = cur == cand
        biased = np.zeros(len(classes), bool) if mined_for is None else \
            np.isin(classes, np.asarray(mined_for, np.int64))
        confirm = same & ~biased
        empty = cur < 0
        expired = age >= self.patience
        replace = ~same & (empty | (cand_cos > cur_cos) | expired)
        clear = same & biased & expired  # only ever "confirmed" by its own mined presence
        reset = confirm | replace | clear
        changed = replace | clear
        self._log.append((step, classes[changed], cur[changed]))
        self.partner[classes[replace]] = cand[replace]
        self.partner[classes[clear]] = -1
        self.cos[classes[confirm | replace]] = cand_cos[confirm | replace]
        self.cos[classes[clear]] = 0
        self.age[classes] = np.where(reset, 0, np.minimum(age.astype(np.int32) + 1, _AGE_MAX))
        self.entries += int(empty.sum()) - int(clear.sum())
        counts.update(seen=len(classes), new=int(empty.sum()), confirmed=int(confirm.sum()),
                      replaced=int((replace & ~empty).sum()), cleared=int(clear.sum()))
        return counts

    def start_at(self, step: int) -> None:
        """An empty table that takes over at ``step`` (mining switched on at a resume)."""
        self.steps = int(step)
        self._log.clear()
        for s in range(max(0, step - self.history), step):
            self._log.append((s, np.zeros(0, np.int64), np.zeros(0, np.int32)))

    # ------------------------------------------------------------------------------- query
    def partners(self, classes, as_of: int | None = None) -> np.ndarray:
        """Partners of ``classes`` in the table as it was after steps 0 … as_of − 1 (default: now).

        ``as_of`` may look back at most ``history`` steps (and never before step 0)."""
        classes = np.asarray(classes, np.int64)
        out = self.partner[classes].astype(np.int64)
        if as_of is None or as_of >= self.steps:
            if as_of is not None and as_of > self.steps:
                raise RuntimeError(
                    f"doppelganger table asked for its state after step {as_of - 1}, but it has "
                    f"only seen {self.steps} steps: the loader plans further ahead than "
                    f"mining.delay allows")
            return out
        oldest = self.steps - len(self._log) if self.history else self.steps
        if as_of < oldest:
            raise RuntimeError(f"doppelganger table keeps {self.history} steps of history; "
                               f"state {as_of} is older than {oldest}")
        for step, changed, old in reversed(self._log):  # newest first: the oldest change wins
            if step < as_of:
                break
            if changed.size:
                pos = np.searchsorted(changed, classes).clip(max=changed.size - 1)
                hit = changed[pos] == classes
                out[hit] = old[pos[hit]]
        return out

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"format": FORMAT, "num_classes": self.num_classes, "steps": self.steps,
                "partner": torch.from_numpy(self.partner.copy()),
                "cos": torch.from_numpy(self.cos.copy()),
                "age": torch.from_numpy(self.age.copy()),
                "log": [(s, torch.from_numpy(c), torch.from_numpy(o)) for s, c, o in self._log]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a doppelganger table state (format {state.get('format')!r}, "
                             f"expected {FORMAT!r})" if isinstance(state, dict) else
                             "not a doppelganger table state")
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"doppelganger table saved for {state['num_classes']} identities, "
                             f"this run has {self.num_classes}")
        self.partner = state["partner"].numpy().astype(np.int32, copy=True)
        self.cos = state["cos"].numpy().astype(np.float16, copy=True)
        self.age = state["age"].numpy().astype(np.uint8, copy=True)
        self.steps = int(state["steps"])
        self.entries = int((self.partner >= 0).sum())  # once, on load
        log = [(int(s), c.numpy().astype(np.int64), o.numpy().astype(np.int32))
               for s, c, o in state["log"]]
        self._log = deque(log[-max(self.history, 1):], maxlen=max(self.history, 1))
        if self.history and self.steps and len(self._log) < min(self.history, self.steps):
            raise ValueError(f"doppelganger table saved with {len(log)} steps of history, this "
                             f"run needs {min(self.history, self.steps)} (mining.delay grew?)")


def hardest_per_class(labels, hardest_class, hardest_cos):
    """Per distinct label with at least one valid row: (class, hardest non-target, its cosine fp16),
    the hardest taken over the class's rows (largest cosine, then smallest id). Sorted by class."""
    y = _numpy(labels).astype(np.int64)
    hid = _numpy(hardest_class).astype(np.int64)
    hcos = _numpy(hardest_cos).astype(np.float32)
    ok = (hid >= 0) & np.isfinite(hcos) & (hid != y)
    y, hid, hcos = y[ok], hid[ok], hcos[ok]
    order = np.lexsort((hid, -hcos, y))
    y, hid, hcos = y[order], hid[order], hcos[order]
    classes, first = np.unique(y, return_index=True)
    return classes, hid[first].astype(np.int32), hcos[first].astype(np.float16)


def _numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class DoppelgangerMiner:
    """The table, the sampler's proposer and the per-step metrics of one rank (all ranks alike).

    Wiring (``attach``): ``sampler.set_proposer(miner.propose, f)``, ``head.report_hardest = True``,
    ``train_step.head_observer = miner.observe``; the trainer calls ``end_step(step, metrics)``
    after every step and merges the metrics it returns.
    """

    def __init__(self, cfg: MiningConfig, num_classes: int, counts=None):
        self.cfg = cfg
        self.table = DoppelgangerTable(num_classes, cfg.patience, history=cfg.delay)
        self.counts = counts  # identity ids → image counts (the data index), or None
        self._planned: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._observed = None

    # -- the sampler's side ------------------------------------------------------------------
    def as_of(self, step: int) -> int:
        return max(0, step - self.cfg.delay)

    def propose(self, step: int, rng, num: int, drawn: np.ndarray) -> np.ndarray:
        """Doppelgangers of the drawn identities (draw order), from the table as of step − delay."""
        drawn = np.asarray(drawn, np.int64)
        state = self.as_of(step)
        partner = self.table.partners(drawn, state)
        ok = (partner >= 0) & ~np.isin(partner, drawn)
        anchor, cand = drawn[ok], partner[ok]
        _, first = np.unique(cand, return_index=True)
        first.sort()
        anchor, cand = anchor[first], cand[first]
        if self.counts is not None and cand.size:
            enough = np.asarray(self.counts(cand)) >= self.cfg.min_images
            anchor, cand = anchor[enough], cand[enough]
        anchor, cand = anchor[:num], cand[:num]
        mutual = self.table.partners(cand, state) == anchor
        self._planned[step] = (anchor, cand, mutual)
        return cand

    # -- the training step's side -------------------------------------------------------------
    def observe(self, embeddings: torch.Tensor, labels: torch.Tensor, out) -> None:
        """Called by the training step right after the head's forward (global batch, every rank)."""
        if out.hardest_class is None:
            raise RuntimeError("doppelganger mining needs each row's hardest non-target: the head "
                               "returned HeadOutput.hardest_class = None although report_hardest "
                               "is set (a head of your own must honour it; docs/extending.md)")
        if getattr(out, "hardest_cos", None) is None:  # e.g. a skipped memory step
            self._observed = (embeddings.detach(), labels, None, None)
            return
        self._observed = (embeddings.detach(), labels, out.hardest_class, out.hardest_cos)

    def end_step(self, step: int, metrics: dict) -> dict:
        """Update the table from step ``step`` (unless it was skipped) and return its metrics."""
        observed, self._observed = self._observed, None
        anchor, mined, mutual = self._planned.pop(step, (np.zeros(0, np.int64),) * 2 + (None,))
        for old in [s for s in self._planned if s < step]:
            del self._planned[old]
        skipped = bool(metrics.get("skipped", 0.0))
        if skipped or observed is None or observed[2] is None:
            counts = self.table.update(step)
        else:
            counts = self.table.update(step, observed[1], observed[2], observed[3],
                                       mined_for=anchor)
        n = self.table.num_classes
        m = {"mining/share_mined": float("nan"), "mining/mutual": float("nan"),
             "mining/cos_mined": float("nan"), "mining/cos_random": float("nan"),
             "mining/entries": self.table.entries / n,
             "mining/replaced": float(counts["replaced"]),
             "mining/confirmed": float(counts["confirmed"]),
             "mining/cleared": float(counts["cleared"])}
        if observed is None:
            return m
        emb, labels = observed[0], observed[1]
        classes, means = class_means(emb, labels)
        m["mining/share_mined"] = len(mined) / max(len(classes), 1)
        if len(mined):
            m["mining/mutual"] = float(np.mean(mutual))
            pos = np.searchsorted(classes, np.stack([anchor, mined]))
            present = (classes[pos.clip(max=len(classes) - 1)] == np.stack([anchor, mined])).all(0)
            if present.any():
                a, b = means[pos[0, present]], means[pos[1, present]]
                m["mining/cos_mined"] = float((a * b).sum(1).mean())
        rest = ~np.isin(classes, mined)
        m["mining/cos_random"] = _mean_pairwise_cos(means[rest])
        return m

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"table": self.table.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.table.load_state_dict(state["table"])


def class_means(embeddings: torch.Tensor, labels: torch.Tensor):
    """Sorted batch classes and their normalized mean embedding (numpy float64)."""
    x = F.normalize(embeddings.detach().float(), dim=1).cpu().double()
    classes, inverse = torch.unique(labels.cpu(), return_inverse=True)
    sums = torch.zeros(len(classes), x.shape[1], dtype=torch.float64).index_add_(0, inverse, x)
    return classes.numpy(), F.normalize(sums, dim=1).numpy()


def _mean_pairwise_cos(u: np.ndarray) -> float:
    """Mean cosine over distinct pairs of unit rows, in O(n·D): (|Σu|² − n) / (n(n − 1))."""
    n = len(u)
    if n < 2:
        return float("nan")
    s = u.sum(0)
    return float((s @ s - (u * u).sum()) / (n * (n - 1)))


def attach(cfg: MiningConfig, loader, head, train_step) -> DoppelgangerMiner | None:
    """Connect a miner to the loader's sampler, the head and the step; None (and no change to any
    of them) when mining is off."""
    if not cfg.enabled:
        return None
    cfg.check_lookahead(loader.lookahead)
    index = loader.sampler.index
    miner = DoppelgangerMiner(cfg, loader.sampler.num_classes, counts=index.counts)
    loader.sampler.set_proposer(miner.propose, cfg.fraction)
    head.report_hardest = True
    train_step.head_observer = miner.observe
    return miner


def planted_recovery(table: DoppelgangerTable, pairs: np.ndarray) -> dict:
    """How well the table found planted look-alike pairs ([n, 2] identity ids, e.g.
    ``SyntheticIdentities.doppelganger_pairs()``): ``recovered``, the share of planted identities
    whose partner is their twin; ``chance``, 1/(N − 1), what a random partner would score;
    ``filled``, the share of planted identities with any partner."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    if not len(pairs):
        return {"recovered": float("nan"), "chance": 1.0 / max(table.num_classes - 1, 1),
                "filled": float("nan"), "pairs": 0}
    ids = pairs.reshape(-1)
    twins = pairs[:, ::-1].reshape(-1)
    partner = table.partners(ids)
    return {"recovered": float((partner == twins).mean()),
            "chance": 1.0 / max(table.num_classes - 1, 1),
            "filled": float((partner >= 0).mean()), "pairs": int(len(pairs))}


def embed_identities(encoder, generator, images_per_identity: int = 8,
                     batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (float32, CPU) of up to ``images_per_identity`` training images of every identity
    of a synthetic ``generator``, in eval mode (the encoder's mode is put back), and each image's
    identity. Renders every identity: small N only."""
    from pm_dist.data.transforms import normalize

    keys = [(c, k) for c in range(generator.num_classes)
            for k in range(min(int(generator.counts([c])[0]), images_per_identity))]
    param = next(encoder.parameters())
    was_training = encoder.training
    encoder.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(keys), batch_size):
            images = np.stack([generator.render(c, k) for c, k in keys[lo:lo + batch_size]])
            out.append(encoder(normalize(images, device=param.device).to(param.dtype)).float().cpu())
    encoder.train(was_training)
    return torch.cat(out), torch.tensor([c for c, _ in keys])


def encoder_recovery(encoder, generator, pairs: np.ndarray, images_per_identity: int = 8,
                     batch_size: int = 256) -> dict:
    """What the encoder itself can find, as the reference for ``planted_recovery``: the share of
    planted identities whose nearest *other* training identity by class mean (up to
    ``images_per_identity`` of its training images, eval mode) is its twin. The table can only be
    as good as the embeddings it sees, so "the table recovers X" reads against this, not only
    against chance. Renders every identity of ``generator`` (synthetic data, small N only)."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    n = generator.num_classes
    classes, means = class_means(*embed_identities(encoder, generator, images_per_identity,
                                                   batch_size))
    sim = means @ means.T
    np.fill_diagonal(sim, -np.inf)
    nearest = np.full(n, -1)
    nearest[classes] = classes[sim.argmax(1)]
    ids, twins = pairs.reshape(-1), pairs[:, ::-1].reshape(-1)
    return {"recovered": float((nearest[ids] == twins).mean()) if len(ids) else float("nan"),
            "chance": 1.0 / max(n - 1, 1), "pairs": int(len(pairs))}
