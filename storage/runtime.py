"""Process-wide settings of the long-running ``pdg`` processes."""

from __future__ import annotations

import gc

#: The cyclic collector's first threshold while serving. Each data call (and
#: each record the ledger writer moves) makes and frees hundreds of container
#: objects, almost all by reference counting; at the default (700) the
#: collector ran every few dozen calls and took several per cent of the
#: gateway's CPU, and a tenth of the ledger writer's, scanning objects that
#: were about to go anyway.
GC_YOUNG_THRESHOLD = 20_000


def freeze_heap() -> None:
    """Call once started: everything allocated so far (modules, settings,
    connection pools) lives as long as the process, so it leaves the
    collector's generations (full collections, and the pauses they cause
    under load, stay short), and young collections become rarer."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
