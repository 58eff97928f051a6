"""Values an operator writes are read strictly: ASCII digits only, nothing float() takes but
a plain decimal, addresses with a port in range."""

import pytest

from sidecar import values


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:50051", ("127.0.0.1", 50051)), ("[::1]:80", ("::1", 80)), ("svc:0", ("svc", 0))],
)
def test_host_port(text: str, expected: tuple[str, int]) -> None:
    assert values.host_port(text) == expected


@pytest.mark.parametrize(
    "text", ["127.0.0.1", ":80", "h:65536", "h:\u0661\u0665\u0660\u0660\u0661", "h:²", "h:-1", "h: 80"]
)
def test_host_port_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        values.host_port(text, "--listen")


@pytest.mark.parametrize("text", ["nan", "inf", "1_0", " 1", "-1", "\u0661", "1e3"])
def test_seconds_are_plain_decimals(text: str) -> None:
    with pytest.raises(ValueError, match="seconds"):
        values.seconds(text)


def test_numbers() -> None:
    assert values.seconds("0.5") == 0.5 and values.seconds(".5") == 0.5 and values.ratio("0.05") == 0.05
    assert values.whole_number("3", minimum=1) == 3
    for bad in ("0", "\u0663", "3.0"):
        with pytest.raises(ValueError):
            values.whole_number(bad, minimum=1)
    with pytest.raises(ValueError):
        values.ratio("1")
    assert values.cluster_weight("canary=20") == ("canary", 20)
    assert values.header("X-User-Id: 42") == ("x-user-id", "42")
    assert values.is_local_address("unix:/run/a.sock") and values.is_local_address("127.0.0.2:1")
    assert not values.is_local_address("10.0.0.1:1")
