"""etcd://HOST:PORT[,HOST:PORT...]/PREFIX: every member checked, with an error naming it."""

import pytest

from sidecar.sources.etcd_address import MAX_MEMBERS, EtcdAddress, EtcdMember
from sidecar.sources.etcd_client import EtcdClient


@pytest.mark.parametrize(
    ("url", "members", "prefix"),
    [
        ("etcd://127.0.0.1:2379/graysteer/checkout", [("127.0.0.1", 2379)], "/graysteer/checkout"),
        (
            "etcd://h1:2379,h2:2380,10.0.0.3:2379/shop/",
            [("h1", 2379), ("h2", 2380), ("10.0.0.3", 2379)],
            "/shop",
        ),
        ("etcd://[::1]:2379,etcd-0.etcd.ns.svc:2379/p", [("::1", 2379), ("etcd-0.etcd.ns.svc", 2379)], "/p"),
        ("etcd://ETCD-A:1,etcd-b:65535/p", [("etcd-a", 1), ("etcd-b", 65535)], "/p"),
    ],
)
def test_one_member_or_several(url: str, members: list[tuple[str, int]], prefix: str) -> None:
    address = EtcdAddress.parse(url)
    assert address.members == tuple(EtcdMember(h, p) for h, p in members)
    assert address.prefix == prefix
    assert EtcdAddress.parse(str(address)) == address  # written back as it is read


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("etcd://h1:2379,,h3:2379/p", "an empty member"),
        ("etcd://h1:2379,/p", "an empty member"),
        ("etcd://,h1:2379/p", "an empty member"),
        ("etcd://h1:2379,h2/p", "member 'h2': no port"),
        ("etcd://h1:2379,h2:/p", "member 'h2:': no port"),
        ("etcd://h1:2379,h2:0/p", "member 'h2:0': no port"),
        ("etcd://h1:2379,h2:70000/p", "member 'h2:70000': Port out of range"),
        ("etcd://h1:2379,h2:x9/p", "member 'h2:x9'"),
        (
            "etcd://h1:2379,h2:\u0662\u0663\u0667\u0669/p",
            "member 'h2:\u0662\u0663\u0667\u0669'",
        ),  # not ASCII digits
        ("etcd://h1:2379,h_2:2379/p", "'h_2' is not a host name"),
        ("etcd://h1:2379,user@h2:2379/p", "member 'user@h2:2379': expected HOST:PORT"),
        ("etcd://[zz::1]:2379/p", "member '[zz::1]:2379'"),
        ("etcd://h1:2379,H1:2379/p", "member h1:2379 is listed twice"),
        ("etcd://" + ",".join(f"h{i}:2379" for i in range(MAX_MEMBERS + 1)) + "/p", "at most 7"),
        ("etcd://h1:2379/", "the prefix must name the service"),
        ("etcd://h1:2379//a", "the prefix must name the service"),
        ("etcd://h1:2379", "expected etcd://HOST:PORT[,HOST:PORT...]/PREFIX"),
        ("etcd://h1:2379, h2:2379/p", "no spaces"),
    ],
)
def test_every_member_is_checked_with_an_error_that_names_it(url: str, says: str) -> None:
    with pytest.raises(ValueError) as raised:
        EtcdAddress.parse(url)
    assert says in str(raised.value)


def test_a_client_starts_on_some_member_and_reports_none_down() -> None:
    address = EtcdAddress.parse("etcd://h1:2379,h2:2379,h3:2379/p")
    starts = {EtcdClient(address).member for _ in range(60)}
    assert starts == set(address.members)  # spread over the cluster, not all on the first
    assert EtcdClient(address).members_report()["members_down"] == []
