"""`etcd://HOST:PORT[,HOST:PORT...]/PREFIX`: the members of one etcd cluster and the prefix of
one service's fleet.

Like every etcd client (etcdctl `--endpoints`, Go's clientv3, the Kubernetes apiserver's
`--etcd-servers`), a replica takes the list of the cluster's members and talks to one of them
at a time, moving to the next when that one fails (sidecar.sources.etcd_client). One address
is still valid: a single member, or a Service, VIP or `etcd grpc-proxy` in front of the cluster.

Each member is checked here, with an error that names it: an empty member, a missing or bad
port, a malformed host, the same member twice, more than MAX_MEMBERS.
"""

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

# etcd advises clusters of at most 7 members (more slow every write down); a list longer than
# that is a mistake (a pasted list of something else), not a cluster.
MAX_MEMBERS = 7
_SCHEME = "etcd://"
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_PORT = re.compile(r"[0-9]{1,5}")
_EXAMPLE = "etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379/graysteer/checkout"


@dataclass(frozen=True, order=True)
class EtcdMember:
    """One etcd member's client address (an IPv6 host without its brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, url: str) -> "EtcdMember":
        """One `HOST:PORT` of `url`'s member list (ValueError naming it)."""
        where = f"{url!r}: member {text!r}"
        if not text.strip():
            raise ValueError(f"{url!r}: an empty member in the list (two commas, or one at an end)")
        try:
            split = urlsplit("//" + text)
            port = split.port
        except ValueError as error:
            raise ValueError(f"{where}: {error} (expected HOST:PORT, the port 1-65535)") from None
        host = split.hostname or ""
        if split.username is not None or split.path or split.query or split.fragment:
            raise ValueError(f"{where}: expected HOST:PORT")
        if port is None or port == 0 or not _PORT.fullmatch(text.rsplit(":", 1)[-1]):
            # (int() would take other scripts' digits, urlsplit with it: ASCII only)
            raise ValueError(f"{where}: no port (expected HOST:PORT, the port 1-65535, e.g. :2379)")
        if text.startswith("["):
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{where}: {host!r} is not an IPv6 address") from None
        elif not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{where}: {host!r} is not a host name or an IPv4 address")
        # urlsplit lower-cases the host: the same member written twice is one member
        return cls(host, port)


@dataclass(frozen=True)
class EtcdAddress:
    """The cluster's members (in the order given) and the prefix of one service's fleet."""

    members: tuple[EtcdMember, ...]
    prefix: str  # without the trailing slash, e.g. /graysteer/checkout

    @classmethod
    def parse(cls, url: str) -> "EtcdAddress":
        if not url.startswith(_SCHEME) or "/" not in url[len(_SCHEME) :]:
            raise ValueError(
                f"expected etcd://HOST:PORT[,HOST:PORT...]/PREFIX (e.g. {_EXAMPLE}), got {url!r}"
            )
        members_text, _, path = url[len(_SCHEME) :].partition("/")
        if any(c.isspace() for c in url):
            raise ValueError(f"{url!r}: no spaces in an etcd URL")
        listed = members_text.split(",")
        if len(listed) > MAX_MEMBERS:
            raise ValueError(
                f"{url!r}: {len(listed)} members, at most {MAX_MEMBERS} (etcd clusters have 3, 5 or 7)"
            )
        members: list[EtcdMember] = []
        for text in listed:
            member = EtcdMember.parse(text, url)
            if member in members:
                raise ValueError(f"{url!r}: member {member} is listed twice")
            members.append(member)
        prefix = "/" + path.rstrip("/")
        if prefix == "/" or "//" in prefix:
            raise ValueError(f"{url!r}: the prefix must name the service, e.g. /graysteer/checkout")
        return cls(tuple(members), prefix)

    def __str__(self) -> str:
        return f"etcd://{','.join(map(str, self.members))}{self.prefix}"

    def key(self, name: str) -> bytes:
        return f"{self.prefix}/{name}".encode()

    @property
    def rules_key(self) -> bytes:
        return self.key("rules")

    @property
    def next_rules_key(self) -> bytes:
        return self.key("rules.next")

    @property
    def state_key(self) -> bytes:
        return self.key("state")

    @property
    def leader_key(self) -> bytes:
        return self.key("leader")

    @property
    def replicas_prefix(self) -> bytes:
        return self.key("replicas/")


def is_etcd(config: str) -> bool:
    return config.startswith(_SCHEME)
