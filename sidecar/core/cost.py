"""What deciding with a table costs: the mean time of its serving engine's `steer` over
synthetic requests built from its own rules (sidecar.core.samples), one per rule and one
that matches none. An estimate: real traffic that matches the first rules costs less, and
requests that match nothing cost the most. A shadow table's sample rate is derived from it
(sidecar.table.shadow) and `graysteer push --next` prints it before writing.
"""

from dataclasses import dataclass
from time import perf_counter

from sidecar.core.diff import synthetic_requests
from sidecar.core.engine import Engine

COST_REQUESTS = 256  # requests steered at most, spread evenly over the table's rules
COST_SECONDS = 0.25  # and for about this long at most (a 5,000-rule table's requests are slow)
DEFAULT_SHADOW_BUDGET_MS = 0.05  # what a shadow table may add to a request on average (serve --shadow-budget)


@dataclass(frozen=True)
class Cost:
    seconds: float  # mean time of one `steer`
    requests: int  # how many it was measured on
    rules: int

    def describe(self) -> str:
        return (
            f"{self.rules} rules, about {self.seconds * 1000:.3f} ms per decision "
            f"(measured on {self.requests} synthetic requests)"
        )


def steering_cost(engine: Engine, seconds: float = COST_SECONDS) -> Cost:
    """The mean time `engine.steer` takes on its table's synthetic requests."""
    requests = synthetic_requests([engine.table], 1)
    step = max(1, len(requests) // COST_REQUESTS)
    total, count = 0.0, 0
    deadline = perf_counter() + seconds
    for request in requests[::step][:COST_REQUESTS]:
        started = perf_counter()
        engine.steer(request)
        total += perf_counter() - started
        count += 1
        if started > deadline:
            break
    return Cost(total / count if count else 0.0, count, len(engine.table.rules))


def sample_rate(cost_seconds: float, budget_seconds: float) -> float:
    """The share of requests a table of `cost_seconds` per decision may decide to cost at
    most `budget_seconds` per request on average."""
    return 1.0 if cost_seconds <= budget_seconds else budget_seconds / cost_seconds
