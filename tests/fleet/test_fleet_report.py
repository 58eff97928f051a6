"""`status --fleet` and the replica records say which etcd member each replica talks to,
which it found down, and how each member answers the command itself."""

import json

import pytest

from sidecar.fleet.fleet import fleet_report, format_fleet
from sidecar.fleet.replicas import RecordError, ReplicaRecord
from sidecar.sources.etcd_address import MAX_MEMBERS
from sidecar.sources.etcd_client import EtcdAddress


def test_a_record_carries_its_etcd_member_and_those_down() -> None:
    record = ReplicaRecord("r0", 1.0, "v1", "v1", True, True, True, {}, "h2:2379", ("h1:2379",))
    assert ReplicaRecord.from_bytes(record.to_bytes()) == record
    older = json.loads(record.to_bytes())
    del older["etcd_member"], older["etcd_down"]  # a replica of a version without them
    assert ReplicaRecord.from_bytes(json.dumps(older).encode()).etcd_member == ""


def test_a_record_listing_more_members_down_than_a_cluster_has_is_refused() -> None:
    data = json.loads(ReplicaRecord("r0", 1.0).to_bytes())
    data["etcd_down"] = [f"h{i}:2379" for i in range(MAX_MEMBERS + 1)]
    with pytest.raises(RecordError, match="etcd_down"):
        ReplicaRecord.from_bytes(json.dumps(data).encode())


def test_status_shows_each_replicas_member_and_each_member_as_reached() -> None:
    address = EtcdAddress.parse("etcd://h1:2379,h2:2379/p")
    record = ReplicaRecord("r0", 0.0, "v1", "v1", True, True, True, {}, "h2:2379", ("h1:2379",))
    report = fleet_report(address, "v1", "r0", [record], [], 1.0)
    assert report["replicas"][0]["etcd_member"] == "h2:2379"
    assert report["replicas"][0]["etcd_down"] == ["h1:2379"]
    report["etcd_members"] = [
        {"member": "h1:2379", "up": False, "etcd_leader": False, "error": "connection refused"},
        {"member": "h2:2379", "up": True, "etcd_leader": True, "error": None},
    ]
    text = format_fleet(report)
    assert "r0: serving v1 [leader], seen 1.0 s ago, via etcd member h2:2379 (down: h1:2379)" in text
    assert "etcd member h1:2379: DOWN: connection refused" in text
    assert "etcd member h2:2379: up, the etcd leader" in text
