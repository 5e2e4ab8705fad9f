"""Which items a dataset `limit` keeps: evenly spaced ones, so sorted splits keep every class."""

from __future__ import annotations


def spread_indices(total: int, limit: int | None) -> list[int] | None:
    """Indices i * total // limit for i < limit (None when the limit keeps everything)."""
    if limit is None or limit >= total:
        return None
    if limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    return [i * total // limit for i in range(limit)]
