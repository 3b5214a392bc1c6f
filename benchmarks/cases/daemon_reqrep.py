"""The req/rep pattern through two daemons (see :mod:`benchmarks.cases.daemon`)."""

from __future__ import annotations

from benchmarks.cases.daemon import DaemonReqRep

CASE = DaemonReqRep()
