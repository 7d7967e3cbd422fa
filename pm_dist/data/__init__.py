"""pm_dist's data pipeline: Arrow datasets, converters, synthetic identities, the P×K sampler and
the training loader. See docs/data.md.

Names are imported lazily so that light users (the converter's worker processes, the sampler)
do not pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataConfig": "config",
    "DataError": "errors", "BadSampleError": "errors", "PeerDataError": "errors",
    "SyntheticIdentities": "synthetic", "IdentificationSet": "synthetic",
    "PKSampler": "sampler", "PKBatch": "sampler",
    "ContiguousIndex": "index", "IdentityIndex": "index",
    "ArrowDataset": "datasets", "SyntheticDataset": "datasets", "build_dataset": "datasets",
    "build_train_loader": "loader", "TrainLoader": "loader",
    "RecordIOReader": "recordio",
    "convert_dataset": "to_arrow", "verify_dataset": "verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pm_dist.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
