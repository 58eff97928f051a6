"""Where a rollout's webhook gates may connect: whoever writes rules chooses a gate's URL, so
the operator of `serve` decides which destinations are reachable (`--gate-allow`).

- A public address (ipaddress' `is_global`, not multicast) is allowed.
- Any other address (loopback, private RFC 1918 and fc00::/7, link-local 169.254/16 and
  fe80::/10, unspecified, shared 100.64/10, multicast, reserved, ...) is refused unless an
  `--gate-allow` entry covers it: an address or network (`10.0.0.0/8`, `127.0.0.1`,
  `fd00::/8`), one address and port (`127.0.0.1:9000`, `[::1]:9000`), or a host name as the
  gate URLs write it (`approvals.internal`, `approvals.internal:8443`: whatever it resolves to).
- Never, even when allowed: the sidecar's own listeners and Envoy's admin (`--envoy-admin`),
  etcd's client address with `--config etcd://`: their port on any of this machine's
  addresses, or on their own address.

The host is resolved when the gate is asked, every address it resolves to is checked (one
refused address refuses the gate), and the request goes to the checked address itself (the
URL's host becomes that address; the Host header and TLS's server name and certificate check
keep the name): a DNS answer that changes between the check and the connection (rebinding)
cannot move the request. Redirects are never followed.
"""

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?)*\.?")


class Refused(Exception):
    """A gate's destination that it may not reach: the reason says which address and why."""


@dataclass(frozen=True)
class Allowed:
    """One `--gate-allow` entry: a network (an address is a /32 or /128) or a host name,
    on every port or one."""

    network: Network | None
    host: str | None
    port: int | None

    def covers(self, host: str, address: Address, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address.version == self.network.version and address in self.network
        return self.host == host


def parse_allowed(text: str) -> Allowed:
    """`--gate-allow`: ADDRESS, NETWORK/BITS, ADDRESS:PORT, [IPv6]:PORT, HOST or HOST:PORT;
    ValueError says what is wrong."""
    entry, port = text.strip().lower(), None
    bracketed = re.fullmatch(r"\[([0-9a-f:.]+)\](?::(\d{1,5}))?", entry)
    if bracketed:
        entry, port = bracketed.group(1), bracketed.group(2)
    elif entry.count(":") == 1:
        entry, port = entry.split(":")
    if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{text!r}: the port must be 1-65535")
    number = int(port) if port is not None else None
    try:
        network = ipaddress.ip_network(entry, strict=True)
    except ValueError as error:
        if "/" in entry or not _HOST_NAME.fullmatch(entry) or entry.replace(".", "").isdigit():
            raise ValueError(
                f"{text!r} is not an address, a network (10.0.0.0/8), ADDRESS:PORT or a host name: {error}"
            ) from None
        return Allowed(None, entry.rstrip("."), number)
    if number is not None and network.num_addresses != 1:
        raise ValueError(f"{text!r}: a port goes with one address, not a network")
    return Allowed(network, None, number)


def unmapped(address: Address) -> Address:
    """::ffff:127.0.0.1 is 127.0.0.1 to the kernel: checked as that."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def kind(address: Address) -> str | None:
    """Why an address is not public (None: it is)."""
    for name, test in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved or not address.is_global),
    ):
        if test:
            return name
    return None


def is_this_machine(address: Address) -> bool:
    """An address of this machine's interfaces (loopback and unspecified included): binding
    a socket to it succeeds only then."""
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Protected:
    """A listener no gate may reach: its port on this machine, or on its own addresses."""

    what: str  # "the sidecar's --admin-listen", "Envoy's admin (--envoy-admin)", ...
    addresses: frozenset[Address]
    port: int

    def holds(self, address: Address, port: int) -> bool:
        return port == self.port and (address in self.addresses or is_this_machine(address))


@dataclass
class GateDestinations:
    """The operator's allow-list and the listeners that are never a gate's destination."""

    allowed: tuple[Allowed, ...] = ()
    protected: list[Protected] = field(default_factory=list)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> "GateDestinations":
        return cls(tuple(parse_allowed(entry) for entry in entries))

    def protect(self, what: str, host: str, port: int) -> None:
        """Never let a gate reach `host:port` (a name is resolved now: a listener's address)."""
        if port <= 0:
            return
        try:
            found = {
                unmapped(ipaddress.ip_address(info[4][0])) for info in socket.getaddrinfo(host or None, port)
            }
        except (OSError, ValueError):
            found = set()
        self.protected.append(Protected(what, frozenset(found), port))

    def covers_loopback(self) -> bool:
        """An entry that allows a loopback address on every port."""
        return any(
            entry.port is None
            and entry.network is not None
            and entry.network.overlaps(_loopback(entry.network))
            for entry in self.allowed
        )

    def check(self, host: str, address: Address, port: int) -> None:
        """Refused when a gate may not connect to `address:port` for URL host `host`."""
        address = unmapped(address)
        for listener in self.protected:
            if listener.holds(address, port):
                raise Refused(f"{address} port {port} is {listener.what}: never a gate's destination")
        why = kind(address)
        if why is None or any(entry.covers(host, address, port) for entry in self.allowed):
            return
        raise Refused(
            f"{address} port {port} is not public ({why}): gates reach it only with serve --gate-allow"
        )

    async def pin(self, url: str) -> "Pinned":
        """The checked address to send `url`'s request to: Refused, or OSError (no address)."""
        target = httpx.URL(url)
        host = target.host.lower().rstrip(".")
        port = target.port or (443 if target.scheme == "https" else 80)
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = list(
                dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos)
            )
        if not addresses:
            raise OSError(f"{host} resolves to no address")
        for address in addresses:  # one refused address refuses the gate: a rebinding answer
            self.check(host, address, port)
        return Pinned(target, addresses[0])


def _loopback(network: Network) -> Network:
    return ipaddress.ip_network("127.0.0.0/8" if network.version == 4 else "::1/128")


@dataclass(frozen=True)
class Pinned:
    """A gate URL and the checked address its request goes to."""

    url: httpx.URL
    address: Address

    def request(self) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
        """(the URL with the address as its host, headers, request extensions): the Host
        header and, for https, TLS's server name keep the URL's host."""
        headers = {"host": self.url.netloc.decode("ascii")}
        named = self.url.host != str(self.address) and self.url.host.strip("[]") != str(self.address)
        extensions = {"sni_hostname": self.url.host} if self.url.scheme == "https" and named else {}
        return self.url.copy_with(host=str(self.address)), headers, extensions
