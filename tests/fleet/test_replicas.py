"""Replica records: written and read back alike; anything else refused with the reason."""

import pytest

from sidecar.fleet.replicas import RecordError, ReplicaRecord
from tests.fleet.test_fleet import counts


def test_records_round_trip() -> None:
    record = ReplicaRecord("r1", 1700000000.5, "v1+o1", "v1", True, True, False, {"canary": counts(10, 1, 9)})
    assert ReplicaRecord.from_bytes(record.to_bytes()) == record
    assert b"Infinity" in record.to_bytes()  # the last bound, Prometheus' +Inf


LANE = '{"requests": 10, "errors": 1, "bounds": [10, Infinity], "buckets": [5, 10]}'


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (
            '{"id": "x", "at": 1, "clusters": {"canary": {"requests": NaN, "errors": 0, "bounds": [], '
            '"buckets": []}}}',
            "NaN",
        ),
        (
            '{"id": "x", "at": 1, "clusters": {"canary": {"requests": 1e400, "errors": 0, "bounds": [], '
            '"buckets": []}}}',
            "finite",
        ),
        (
            '{"id": "x", "at": 1, "clusters": {"canary": {"requests": -1, "errors": 0, "bounds": [], '
            '"buckets": []}}}',
            "minimum",
        ),
        (
            '{"id": "x", "at": 1, "clusters": {"canary": {"requests": 1, "errors": 5, "bounds": [], '
            '"buckets": []}}}',
            "more errors",
        ),
        (
            '{"id": "x", "at": 1, "clusters": {"c": {"requests": 9, "errors": 0, "bounds": [Infinity, 10], '
            '"buckets": [1, 9]}}}',
            "finite|increasing",
        ),
        (
            '{"id": "x", "at": 1, "clusters": {"c": {"requests": 9, "errors": 0, "bounds": [1, 2], '
            '"buckets": [9]}}}',
            "bounds for",
        ),
        (
            '{"id": "x", "at": 1, "clusters": {"c": {"requests": 9, "errors": 0, "bounds": [1, 2], '
            '"buckets": [9, 3]}}}',
            "decrease",
        ),
        ('{"id": "x", "at": 1, "clusters": {"canary": {"requests": "many"}}}', "required|type"),
        ('{"id": "x", "at": Infinity}', "finite"),
        ('{"id": "", "at": 1}', "short|minLength|non-empty"),
        ('{"at": 1}', "required"),
        ('"nonsense"', "type"),
        ("{not json", "not JSON"),
        (
            '{"id": "x", "at": 1, "clusters": {' + ", ".join(f'"c{i}": {LANE}' for i in range(65)) + "}}",
            "many",
        ),
        ('{"id": "x", "at": 1, "pad": "' + "x" * 70_000 + '"}', "over the limit"),
    ],
)
def test_a_record_that_is_not_one_is_refused_with_the_reason(raw: str, why: str) -> None:
    with pytest.raises(RecordError, match=why):
        ReplicaRecord.from_bytes(raw.encode())
