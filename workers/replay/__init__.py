"""Offline SerpApi-compatible replay service (``python -m workers.replay``) and its generated image catalog."""
from workers.replay.catalog import (  # noqa: F401
    DEFAULT_LABELS,
    Entry,
    entry_for_path,
    expected_counts,
    page_entries,
)
from workers.replay.server import ReplayServer, decode_token, make_chips, make_uds  # noqa: F401

__all__ = [
    "DEFAULT_LABELS",
    "Entry",
    "ReplayServer",
    "decode_token",
    "entry_for_path",
    "expected_counts",
    "make_chips",
    "make_uds",
    "page_entries",
]
