"""The answer cache every transport shares stays within its byte bound, whatever clients send."""

from pathlib import Path

from prometheus_client import CollectorRegistry

from sidecar.core import Decision, Steering
from sidecar.ops.metrics import Metrics
from sidecar.table.decider import Decider
from sidecar.table.holder import TableHolder
from sidecar.table.load import load_rules
from sidecar.transports.answers import AnswerCache
from sidecar.transports.explain import headers_message
from sidecar.transports.ext_proc import ExtProcServicer
from sidecar.transports.http_check import answer_bytes

EXAMPLE = Path(__file__).parents[2] / "examples" / "rules.yaml"  # with coloring: baggage is answered


def test_answer_cache_is_bounded_in_bytes_and_skips_large_answers() -> None:
    cache = AnswerCache(answer_bytes, max_bytes=4096, max_entry=512)
    for i in range(100):
        steering = Steering(Decision("stable", f"rule-{i}", "v1"), (("x-route-cluster", "stable"),))
        assert cache.get(steering) == answer_bytes(steering)
        assert cache.size <= 4096
    large = Steering(Decision("stable", "r", "v1"), (("baggage", "k=" + "v" * 1000),))
    before = cache.size
    assert cache.get(large) == answer_bytes(large)
    assert cache.size == before


def test_unique_large_baggage_never_grows_the_ext_proc_cache() -> None:
    """The attack: every request with its own 48 KiB baggage. Before, each answer (keyed on
    that baggage) was kept, 10,000 of them; now none of them is."""
    servicer = ExtProcServicer(Decider(TableHolder(load_rules(EXAMPLE)), Metrics(CollectorRegistry())))
    for i in range(300):
        baggage = f"tenant={i}," + ",".join(f"k{j}={'v' * 40}" for j in range(1100))  # ~48 KiB
        message = headers_message("GET", "/", [("x-user-id", f"u{i}"), ("baggage", baggage)])
        assert servicer.answer(message)
    assert servicer.answers.size <= servicer.answers.max_bytes
    assert len(servicer.answers) <= 100  # the small answers only: at most one per bucket


def test_answers_by_steering_object_and_by_value_agree_and_stay_bounded() -> None:
    cache = AnswerCache(answer_bytes, max_bytes=4096, max_entry=512)
    shared = Steering(Decision("stable", "r", "v1"), (("x-route-cluster", "stable"),))
    assert cache.get(shared) is cache.get(shared)  # the second from the object's identity
    for i in range(500):  # equal Steerings, each a new object (as for callers with an identity)
        equal = Steering(Decision("stable", "r", "v1"), (("x-route-cluster", "stable"),))
        assert cache.get(equal) == answer_bytes(shared)
        other = Steering(Decision("canary", f"r{i}", "v1"), (("x-route-cluster", "canary"),))
        assert cache.get(other) == answer_bytes(other)
        assert len(cache._by_identity) <= len(cache)  # never more objects kept than answers
