"""The range of timestamps the engine accepts, in one place.

Request times, history and event timestamps must fall in [1990-01-01, 2100-01-01) UTC with nanos in
[0, 999999999]: wide enough for every public interaction log (MovieLens starts in 1995) and any
plausible replay, narrow enough that epoch microseconds stay far inside int64 and every datetime
conversion (NumPy, polars, Python) is exact. A value outside is refused at the edge, naming the field,
instead of overflowing somewhere inside feature code.
"""

from __future__ import annotations

from datetime import datetime, timezone

MIN_US = int(datetime(1990, 1, 1, tzinfo=timezone.utc).timestamp()) * 1_000_000
MAX_US = int(datetime(2100, 1, 1, tzinfo=timezone.utc).timestamp()) * 1_000_000  # exclusive
RANGE_TEXT = "1990-01-01T00:00:00Z <= t < 2100-01-01T00:00:00Z"


# What internal conversions accept (`recsys.features.to_us`): any time a datetime can hold (years
# 1..9999), so µs never overflow int64; the narrower range above is the API's contract.
REPRESENTABLE_MIN_US = int(datetime(1, 1, 1, tzinfo=timezone.utc).timestamp()) * 1_000_000
REPRESENTABLE_MAX_US = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()) * 1_000_000


def out_of_range(t_us: int) -> bool:
    return not MIN_US <= t_us < MAX_US


def unrepresentable(t_us: int) -> bool:
    return not REPRESENTABLE_MIN_US <= t_us <= REPRESENTABLE_MAX_US


def range_problem(seconds: int, nanos: int) -> str | None:
    """What is wrong with a (seconds, nanos) timestamp, or None if it is in range."""
    if not 0 <= nanos <= 999_999_999:
        return f"nanos must be in [0, 999999999], got {nanos}"
    if out_of_range(seconds * 1_000_000 + nanos // 1000):
        return f"seconds={seconds} is outside the accepted range {RANGE_TEXT}"
    return None
