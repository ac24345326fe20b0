"""Wrote events.journal here with the code before served-lists records (commit 46cf817): what its
servicer and StateService.flush_exposures appended. Run from that checkout:
PYTHONPATH=<46cf817 checkout> python make.py <this directory>"""

import sys

import numpy as np

from recsys.serving.validation import EventsInput
from recsys.state.codec import concat, encode
from recsys.state.journal import Journal

T0 = 1_769_860_800_000_000


def served(user, t, req, items):  # recsys/serving/servicer.py _respond before the change
    n = len(items)
    return EventsInput([user] * n, items, ["impression"] * n, np.full(n, t, np.int64), [req] * n, np.full(n, np.nan))


journal = Journal(sys.argv[1])
clicks = EventsInput(["u1", "new-a"], ["i3", "i4"], ["click", "purchase"], np.array([T0, T0 + 1], np.int64),
                     ["r-1", None], np.array([np.nan, 3.0]))
journal.append_wait(encode(clicks, "stream-1"))
lists = [served("u1", T0 + 2, "r-1", ["i3", "i5", "i7"]), served("new-b", T0 + 3, "r-2", ["i9", "cold-x", "i3"]),
         served("viewer-cold", T0 + 4, "r-3", ["cold-y"]), served("u2", T0 + 5, None, ["i11", "i12"])]
journal.append_wait(encode(concat(lists)))  # StateService.flush_exposures: one record of every buffered list
journal.append_wait(encode(served("u1", T0 + 6, "r-4", ["i5", "i6"])))
journal.close()
