"""The shipper's summary line describes the whole run, every rescan (issue 9 item 10)."""

from __future__ import annotations

from dlogd.ship import CollectorResult, whole_run


def test_a_rescan_that_hit_a_timeout_keeps_what_the_first_pass_delivered() -> None:
    first = [
        CollectorResult("logs1", owed=43, delivered=1),
        CollectorResult("logs2", owed=1, delivered=1),
    ]
    rescan = [CollectorResult("logs1", owed=42, failed=0, error="timed out")]

    [logs1, logs2] = whole_run(first, rescan)

    assert logs1.summary().startswith("logs1: 1/43 delivered (timed out)")
    assert (logs1.owed, logs1.delivered, logs1.pending, logs1.complete) == (43, 1, True, False)
    assert logs2 == first[1]


def test_two_passes_that_both_delivered_add_up() -> None:
    first = [CollectorResult("logs1", owed=5, delivered=4, duplicates=1)]
    rescan = [CollectorResult("logs1", owed=2, delivered=2)]

    [logs1] = whole_run(first, rescan)

    assert (logs1.owed, logs1.delivered, logs1.duplicates) == (7, 6, 1)
    assert logs1.complete and logs1.summary() == "logs1: 7/7 delivered"
