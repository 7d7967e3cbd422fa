"""The identity index: what the sampler needs to know about a dataset, and nothing more.

A dataset's index answers four questions:

* ``num_classes``: identities are 0 .. num_classes-1;
* ``counts(classes)``: images of each given identity (vectorised);
* ``max_count``: an upper bound of the counts (for count-weighted sampling by rejection);
* ``sample_index(classes, ks)``: the dataset index of image k of identity c (vectorised).

and, optionally, ``count_array()``: all counts as one array when the dataset has them anyway (an
Arrow dataset), or ``None`` when producing them would cost O(N) memory for nothing (synthetic
identities, where uniform sampling needs no table at all).

Two implementations: ``ContiguousIndex`` (images of identity c are dataset rows start[c] ..
start[c]+count[c]-1, as in an Arrow dataset) and the synthetic dataset's, which encodes
(c, k) as c·2²⁰ + k.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class IdentityIndex(Protocol):
    num_classes: int
    max_count: int

    def counts(self, classes: np.ndarray) -> np.ndarray: ...

    def sample_index(self, classes: np.ndarray, ks: np.ndarray) -> np.ndarray: ...

    def count_array(self) -> np.ndarray | None: ...


class ContiguousIndex:
    """Index over rows grouped by identity: identity c owns rows [start[c], start[c] + count[c])."""

    def __init__(self, counts: np.ndarray, starts: np.ndarray | None = None):
        counts = np.asarray(counts, dtype=np.int64)
        if counts.ndim != 1 or counts.size == 0:
            raise ValueError("counts must be a non-empty 1-D array")
        if (counts < 0).any():
            raise ValueError(f"negative image count for identity {int(np.argmax(counts < 0))}")
        if starts is None:
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        starts = np.asarray(starts, dtype=np.int64)
        if starts.shape != counts.shape:
            raise ValueError("starts and counts must have the same length")
        self._counts, self._starts = counts, starts
        self.num_classes = int(counts.size)
        self.max_count = int(counts.max())
        self.num_images = int(counts.sum())

    def counts(self, classes) -> np.ndarray:
        return self._counts[np.asarray(classes, dtype=np.int64)]

    def count_array(self) -> np.ndarray:
        return self._counts

    def starts(self) -> np.ndarray:
        return self._starts

    def sample_index(self, classes, ks) -> np.ndarray:
        classes, ks = np.asarray(classes, dtype=np.int64), np.asarray(ks, dtype=np.int64)
        if ((ks < 0) | (ks >= self._counts[classes])).any():
            raise IndexError("image number out of range for its identity")
        return self._starts[classes] + ks

    def class_of(self, indices) -> np.ndarray:
        """Identity owning each row (rows must lie in some identity's range)."""
        ends = self._starts + self._counts
        order = np.argsort(self._starts, kind="stable")
        pos = np.searchsorted(self._starts[order], np.asarray(indices, np.int64), side="right") - 1
        cls = order[np.clip(pos, 0, None)]
        idx = np.asarray(indices, np.int64)
        if ((pos < 0) | (idx >= ends[cls]) | (idx < self._starts[cls])).any():
            raise IndexError("row outside every identity's range")
        return cls
