"""Values an operator writes (flags, addresses, numbers), read strictly: ValueError says what
was expected. Numbers are ASCII digits only: int() and str.isdigit() also take other
scripts' digits (Arabic-Indic digits for 15001 are 15001 to int()), and float() takes `_`,
blanks, nan and inf."""

import ipaddress
import re

_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def is_ascii_number(text: str) -> bool:
    """Whether `text` is one or more ASCII digits."""
    return text.isascii() and text.isdecimal()


def host_port(address: str, what: str = "address") -> tuple[str, int]:
    """'127.0.0.1:50051' -> ('127.0.0.1', 50051); '[::1]:80' -> ('::1', 80)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not is_ascii_number(port) or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: expected HOST:PORT (e.g. 127.0.0.1:50051), got {address!r}")
    return host.strip("[]"), int(port)


def is_local_address(address: str) -> bool:
    """True for a unix socket or a loopback HOST:PORT."""
    if address.startswith("unix:"):
        return True
    host, _ = host_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def whole_number(text: str, minimum: int = 0) -> int:
    if not is_ascii_number(text) or int(text) < minimum:
        raise ValueError(f"expected a whole number >= {minimum}, got {text!r}")
    return int(text)


def seconds(text: str) -> float:
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"expected a number of seconds >= 0, got {text!r}")
    return float(text)


def ratio(text: str) -> float:
    value = float(text) if _DECIMAL.fullmatch(text) else -1.0
    if not 0 <= value < 1:
        raise ValueError(f"expected a share from 0 to below 1 (e.g. 0.05), got {text!r}")
    return value


def share(text: str) -> float:
    """A share above 0 and up to 1 (a sampling rate)."""
    value = float(text) if _DECIMAL.fullmatch(text) else -1.0
    if not 0 < value <= 1:
        raise ValueError(f"expected a share above 0 and up to 1 (e.g. 0.01), got {text!r}")
    return value


def header(text: str) -> tuple[str, str]:
    """'Name: value' -> ('name', 'value')."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip() or " " in name.strip():
        raise ValueError(f"expected 'Name: value', got {text!r}")
    return name.strip().lower(), rest.strip()


def pair(text: str) -> tuple[str, str]:
    """'name=value' -> ('name', 'value')."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise ValueError(f"expected name=value, got {text!r}")
    return name, rest


def cluster_weight(text: str) -> tuple[str, int]:
    """'canary=20' -> ('canary', 20)."""
    cluster, sep, weight = text.partition("=")
    if not sep or not cluster or not is_ascii_number(weight):
        raise ValueError(f"expected CLUSTER=WEIGHT with a whole number >= 0, got {text!r}")
    return cluster, int(weight)


def cluster_address(text: str) -> tuple[str, tuple[str, int]]:
    """'canary=10.0.0.7:8080' -> ('canary', ('10.0.0.7', 8080))."""
    cluster, sep, address = text.partition("=")
    if not sep or not cluster:
        raise ValueError(f"expected CLUSTER=HOST:PORT, got {text!r}")
    return cluster, host_port(address, "--upstream")
