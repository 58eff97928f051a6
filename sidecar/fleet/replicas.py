"""A replica's record in its fleet (PREFIX/replicas/<id> in etcd): what it serves and what
its Envoy saw of each cluster. Written by each replica under its lease, read by every one.

Anyone who can write under the prefix can put a record there, so a record is input: it is
read only if it passes the schema below, with every number finite and within bounds, at
most MAX_RECORD_BYTES, at most MAX_CLUSTERS clusters and MAX_BUCKETS histogram buckets
(the one exception to "finite": the last histogram bound is +Inf, Prometheus' `le="+Inf"`).
A record that does not pass is left out and counted; it never reaches an analysis.
"""

import json
import math
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from sidecar.sources.etcd_address import MAX_MEMBERS
from sidecar.stats.clusters import ClusterCounts

MAX_RECORD_BYTES = 64 * 1024
MAX_CLUSTERS = 64
MAX_BUCKETS = 64
MAX_NAME = 253

_CLUSTER = {
    "type": "object",
    "required": ["requests", "errors", "bounds", "buckets"],
    "properties": {
        "requests": {"type": "number", "minimum": 0},
        "errors": {"type": "number", "minimum": 0},
        "bounds": {"type": "array", "maxItems": MAX_BUCKETS, "items": {"type": "number", "minimum": 0}},
        "buckets": {"type": "array", "maxItems": MAX_BUCKETS, "items": {"type": "number", "minimum": 0}},
    },
}
RECORD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["id", "at"],
    "properties": {
        "id": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
        "at": {"type": "number", "minimum": 0},
        "version": {"type": "string", "maxLength": 128},
        "file_version": {"type": "string", "maxLength": 128},
        "ready": {"type": "boolean"},
        "source_connected": {"type": "boolean"},
        "leader": {"type": "boolean"},
        "etcd_member": {"type": "string", "maxLength": MAX_NAME + 6},
        "etcd_down": {
            "type": "array",
            "maxItems": MAX_MEMBERS,
            "items": {"type": "string", "maxLength": MAX_NAME + 6},
        },
        "clusters": {
            "type": "object",
            "maxProperties": MAX_CLUSTERS,
            "propertyNames": {"maxLength": MAX_NAME},
            "additionalProperties": _CLUSTER,
        },
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(RECORD_SCHEMA)


class RecordError(ValueError):
    """A replica record that cannot be read."""


@dataclass(frozen=True)
class ReplicaRecord:
    id: str
    at: float  # the writer's wall clock when it wrote (for "seen N s ago", never for holds)
    version: str = ""
    file_version: str = ""
    ready: bool = False
    source_connected: bool = False
    leader: bool = False
    clusters: dict[str, ClusterCounts] = field(default_factory=dict)  # cumulative, by cluster
    etcd_member: str = ""  # the etcd member it talks to ("" from a replica before the field)
    etcd_down: tuple[str, ...] = ()  # the members that failed when it last used them

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "id": self.id,
                "at": self.at,
                "version": self.version,
                "file_version": self.file_version,
                "ready": self.ready,
                "source_connected": self.source_connected,
                "leader": self.leader,
                "etcd_member": self.etcd_member,
                "etcd_down": list(self.etcd_down),
                "clusters": {
                    cluster: {
                        "requests": c.requests,
                        "errors": c.errors,
                        "bounds": list(c.bounds),
                        "buckets": list(c.buckets),
                    }
                    for cluster, c in self.clusters.items()
                },
            }
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "ReplicaRecord":
        """RecordError says what is wrong."""
        if len(raw) > MAX_RECORD_BYTES:
            raise RecordError(f"{len(raw)} bytes, over the limit of {MAX_RECORD_BYTES}")
        try:
            data = json.loads(raw, parse_constant=_infinity_only)
        except (ValueError, RecursionError) as error:
            raise RecordError(f"not JSON: {error}") from None
        errors = sorted(_VALIDATOR.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
        if errors:
            where = "/".join(str(p) for p in errors[0].absolute_path) or "(record)"
            raise RecordError(f"{where}: {errors[0].message}")
        clusters = {cluster: _counts(cluster, c) for cluster, c in (data.get("clusters") or {}).items()}
        if not math.isfinite(data["at"]):
            raise RecordError("at: not a finite number")
        return cls(
            data["id"],
            float(data["at"]),
            data.get("version", ""),
            data.get("file_version", ""),
            data.get("ready", False),
            data.get("source_connected", False),
            data.get("leader", False),
            clusters,
            data.get("etcd_member", ""),
            tuple(data.get("etcd_down", ())),
        )


def _infinity_only(name: str) -> float:
    if name == "Infinity":  # the +Inf histogram bound; checked to be only that below
        return math.inf
    raise ValueError(f"{name} is not a number a record may hold")


def _counts(cluster: str, c: dict[str, Any]) -> ClusterCounts:
    bounds, buckets = c["bounds"], c["buckets"]
    numbers = [c["requests"], c["errors"], *bounds[:-1], *buckets]
    if not all(math.isfinite(n) for n in numbers):
        raise RecordError(f"clusters/{cluster}: a number is not finite")
    if len(bounds) != len(buckets):
        raise RecordError(f"clusters/{cluster}: {len(bounds)} bounds for {len(buckets)} buckets")
    if any(b >= a for a, b in zip(bounds[1:], bounds, strict=False)):
        raise RecordError(f"clusters/{cluster}: bounds are not increasing")
    if any(b > a for a, b in zip(buckets[1:], buckets, strict=False)):
        raise RecordError(f"clusters/{cluster}: cumulative buckets decrease")
    if c["errors"] > c["requests"]:
        raise RecordError(f"clusters/{cluster}: more errors than requests")
    return ClusterCounts(float(c["requests"]), float(c["errors"]), tuple(bounds), tuple(buckets))
