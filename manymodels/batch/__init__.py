"""Batch scoring of CSV/Parquet files through a bundle: exactly once, resumable, fast.

``score_batch`` plans pieces of the input (:mod:`.plan`), scores them in workers
(:mod:`.score`, reading with :mod:`.io`), and commits each piece atomically into OUTPUT
under a transaction log (:mod:`.txlog`), so a rerun after any crash finishes what is
missing and leaves exactly one output row per input row.
"""

from __future__ import annotations

from .run import (
    BatchProgress,
    BatchSummary,
    ErrorThresholdExceeded,
    NothingScored,
    choose_workers,
    score_batch,
)

__all__ = ["BatchProgress", "BatchSummary", "ErrorThresholdExceeded", "NothingScored",
           "choose_workers",
           "score_batch"]
