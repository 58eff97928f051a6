"""Every core test runs twice: once against the reference engine (`steer`, `Table.decide`,
`Table.denied` as written), and once with each of those calls also answered by the serving
engine (sidecar.core.engine: the generated rule chain and the short steering path) and
compared with the reference's answer. A difference in the answer, the exception raised or
the random numbers drawn fails the test; the reference's answer is what the test sees."""

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import sidecar.core
import sidecar.core.steering
from sidecar.core import Decision, Request, Steering, Table
from sidecar.core.engine import Engine

REFERENCE_STEER = sidecar.core.steering.steer
REFERENCE_DECIDE = Table.decide
REFERENCE_DENIED = Table.denied


class Differential:
    """The reference's answers, each checked against the engine's."""

    def __init__(self) -> None:
        self.engines: dict[int, tuple[Table, Engine]] = {}
        self.compared = 0

    def engine(self, table: Table) -> Engine:
        known = self.engines.get(id(table))
        if known is None or known[0] is not table:
            known = self.engines[id(table)] = (table, Engine(table))
        return known[1]

    def compare(self, table: Table, reference: Callable[[], Any], served: Callable[[Engine], Any]) -> Any:
        engine = self.engine(table)
        if not engine.generated:  # its rules walk is the reference's own (patched here)
            return reference()
        state = random.getstate()
        expected, expected_error = _outcome(reference)
        after = random.getstate()
        random.setstate(state)
        answer, error = _outcome(lambda: served(engine))
        assert type(error) is type(expected_error), f"engine raised {error!r}, reference {expected_error!r}"
        assert answer == expected, f"engine {answer!r} != reference {expected!r}"
        assert random.getstate() == after, "the engine drew other random numbers than the reference"
        self.compared += 1
        if expected_error is not None:
            raise expected_error
        return expected

    def steer(self, table: Table, request: Request) -> Steering:
        return self.compare(table, lambda: REFERENCE_STEER(table, request), lambda e: e.steer(request))

    def decide(self, table: Table, request: Request) -> Decision:
        return self.compare(table, lambda: REFERENCE_DECIDE(table, request), lambda e: e.decide(request))

    def denied(self, table: Table, request: Request) -> Decision | None:
        return self.compare(table, lambda: REFERENCE_DENIED(table, request), lambda e: e.denied(request))


def _outcome(call: Callable[[], Any]) -> tuple[Any, Exception | None]:
    try:
        return call(), None
    except Exception as error:
        return None, error


@pytest.fixture(scope="module", autouse=True, params=["reference", "engine"])
def engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Which engine answers: `engine` checks the serving engine against the reference."""
    if request.param == "reference":
        yield request.param
        return
    differential = Differential()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Table, "denied", _method(differential.denied))
        patch.setattr(Table, "decide", _method(differential.decide))
        for module in (request.module, sidecar.core, sidecar.core.steering):
            if getattr(module, "steer", None) is REFERENCE_STEER:
                patch.setattr(module, "steer", differential.steer)
        yield request.param


def _method(bound: Callable[[Table, Request], Any]) -> Callable[[Table, Request], Any]:
    """A function that, set on Table, gets the table as its first argument."""

    def method(table: Table, request: Request) -> Any:
        return bound(table, request)

    return method
