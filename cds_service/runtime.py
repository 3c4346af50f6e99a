"""Process settings for a serving worker, applied once it has built the app (`post_worker_init`, cds_service.serving).

The garbage collector is tuned because a hook call allocates in proportion to its record (a 10,000-resource prefetch
is about a million objects, nearly all acyclic and freed by reference counting): with CPython's default thresholds
such a call triggers dozens of collections, the later ones scanning everything the call built so far, which made
large records super-linear. Start-up objects (mappings, models, the ConText pipeline) are frozen out of the scans.
"""

from __future__ import annotations

import gc

# Young collections every 50,000 net allocations instead of 700; the older generations as CPython's ratios.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc_after_startup() -> None:
    """Freeze what start-up built and make collections proportionate to the work of a call."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
