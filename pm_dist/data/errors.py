"""The data layer's exceptions: every one names the file and index (or source id) it is about."""

from __future__ import annotations


class DataError(RuntimeError):
    """A dataset that cannot be used as a whole: missing or malformed manifest, truncated shard..."""


class BadSampleError(DataError):
    """One sample that cannot be used (corrupt or undecodable image, label out of range...).

    ``where`` names the place (e.g. ``"/data/ms1m/shard-00003.arrow row 17"``), ``index`` is the
    dataset-wide sample index, ``source`` the sample's id in the original data (``train.rec#123``,
    ``id042/0003.jpg``) when known, ``reason`` what is wrong.
    """

    def __init__(self, where: str, index: int | None, source: str | None, reason: str):
        self.where, self.index, self.source, self.reason = where, index, source, reason
        parts = [where]
        if index is not None:
            parts.append(f"sample index {index}")
        if source:
            parts.append(f"source {source!r}")
        super().__init__(f"bad sample at {', '.join(parts)}: {reason}")

    def __reduce__(self):  # keep the fields across processes (DataLoader workers, gloo peers)
        return (type(self), (self.where, self.index, self.source, self.reason))


class PeerDataError(DataError):
    """Raised on every rank when another rank failed to produce its batch, so no rank waits forever
    in the next collective for a peer that will not come."""
