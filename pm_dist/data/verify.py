"""The verification pass over a converted Arrow dataset: is every byte what the converter wrote?

Checks, each reported with the file (and row and source id where there is one):

* the manifest (format, version, shard rows tiling the dataset) and the identity table (one row per
  identity, ranges tiling the rows);
* per shard: present, the recorded size, the recorded SHA-256 (catches any tampering, header and
  footer included), readable as Arrow IPC with the expected schema and row count;
* per row: the image bytes match their crc32 (names the damaged row), the label lies in
  [0, num_identities) and is the identity whose range holds the row;
* with ``decode``: every image decodes (slow: a full decode of the dataset).

Shards are checked in parallel with ``workers`` processes.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np

from pm_dist.files import sha256_file

from .arrow_format import ShardReader, crc32
from .errors import DataError
from .transforms import DECODE_ERRORS, decode

MAX_PROBLEMS_PER_SHARD = 20


@dataclass
class VerifyReport:
    path: str
    shards_checked: int = 0
    rows_checked: int = 0
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shard(path: str, entry: dict, expected_labels: np.ndarray, num_identities: int,
                 decode_images: bool) -> tuple[int, list[str]]:
    """(rows checked, problems) of one shard."""
    problems: list[str] = []
    try:
        size = os.path.getsize(path)
    except OSError:
        return 0, [f"{path}: shard file is missing"]
    if size != entry["bytes"]:
        problems.append(f"{path}: {size} bytes, manifest says {entry['bytes']} "
                        f"({'truncated' if size < entry['bytes'] else 'extended'})")
    elif sha256_file(path) != entry["sha256"]:
        problems.append(f"{path}: SHA-256 differs from the manifest (the file was modified)")
    try:
        reader = ShardReader(path)
    except DataError as e:
        return 0, problems + [str(e)]
    if reader.num_rows != entry["rows"]:
        problems.append(f"{path}: {reader.num_rows} rows, manifest says {entry['rows']}")
    rows = min(reader.num_rows, entry["rows"])
    row_problems = 0
    for j in range(rows):
        image, label, source, stored = reader.row(j)
        issue = None
        if crc32(image) != stored:
            issue = "image bytes do not match their crc32"
        elif not 0 <= label < num_identities:
            issue = f"label {label} outside [0, {num_identities})"
        elif label != expected_labels[j]:
            issue = f"label {label}, but the identity table puts identity {expected_labels[j]} here"
        elif decode_images:
            try:
                decode(image)
            except DECODE_ERRORS as e:
                issue = f"image does not decode: {e}"
        if issue:
            row_problems += 1
            if row_problems <= MAX_PROBLEMS_PER_SHARD:
                problems.append(f"{path} row {j} (dataset row {entry['first_row'] + j}, "
                                f"source {source!r}): {issue}")
    if row_problems > MAX_PROBLEMS_PER_SHARD:
        problems.append(f"{path}: {row_problems - MAX_PROBLEMS_PER_SHARD} more bad rows not listed")
    reader.close()
    return rows, problems


def verify_dataset(path: str, decode: bool = False, workers: int = 1) -> VerifyReport:
    """Check a dataset directory; ``report.ok`` is True when nothing is wrong."""
    path = os.path.abspath(path)
    report = VerifyReport(path)
    try:
        from .datasets import ArrowDataset

        # "skip": collect shard problems below instead of stopping at the first truncated shard
        ds = ArrowDataset(path, bad_sample="skip")
    except DataError as e:
        report.problems.append(str(e))
        return report
    m = ds.manifest
    counts = ds.count_array()
    row_labels = np.repeat(np.arange(m.num_identities, dtype=np.int64), counts)
    jobs = [(os.path.join(path, s["file"]), s, row_labels[s["first_row"]: s["first_row"] + s["rows"]],
             m.num_identities, decode) for s in m.shards]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(verify_shard, *zip(*jobs)))
    else:
        results = [verify_shard(*j) for j in jobs]
    for rows, problems in results:
        report.shards_checked += 1
        report.rows_checked += rows
        report.problems.extend(problems)
    return report
