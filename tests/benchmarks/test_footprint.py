"""The footprint benchmark measures real checks: each protocol it feeds answers every check
(without valgrind: the protocols alone)."""

from typing import Any

from benchmarks.check_path import check_bytes
from benchmarks.empty_http import ANSWER
from benchmarks.footprint import protocol


def written(kind: str, checks: int) -> int:
    feed: Any = protocol(kind)
    for user in range(checks):
        feed(check_bytes(user))
    return int(feed.__self__.transport.written)


def test_each_protocol_answers_every_check() -> None:
    floor, layer, whole = (written(kind, 50) for kind in ("floor", "http layer", "graysteer"))
    assert floor == 50 * len(ANSWER)
    assert layer > floor and whole > floor  # graysteer's answers carry the decision's headers


def test_the_whole_check_decides_each_request() -> None:
    feed: Any = protocol("graysteer")
    decider = feed.__self__.server.decider
    for user in range(200):
        feed(check_bytes(user))
    registry = decider.metrics.registry
    split = [
        registry.get_sample_value("graysteer_decisions_total", {"cluster": cluster, "rule": "checkout-ramp"})
        for cluster in ("stable", "canary")
    ]
    assert split[0] and split[1] and split[0] + split[1] == 200  # both lanes of the split, every check
