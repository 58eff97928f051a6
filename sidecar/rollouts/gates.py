"""Asking a rollout's webhook gates (sidecar.core.gates), never on the controller's tick:
each check is a background task, at most one in flight per (rule, gate), asked again at a
bounded pace while the move waits, and its answer counts only for the move it was asked
about (the rollout's fingerprint and step). A 2xx answer passes; any other answer, no
answer within the gate's timeout or a failed connection keeps the move waiting (never an
abort): the reason is kept for status, /rollouts and the live views. A gate reaches only
the destinations the operator allows (sidecar.rollouts.destinations): a refused one fails the
check (`blocked`) and is never connected to."""

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from sidecar.core.gates import Gate, GateResult, shown_url
from sidecar.core.rollout import RolloutSpec, RolloutState, Verdict
from sidecar.ops.metrics import Metrics
from sidecar.rollouts.destinations import GateDestinations, Refused
from sidecar.rollouts.tasks import cancel_all

log = logging.getLogger("graysteer.rollout")

# A failed gate is asked again at most this often while its move waits; a pass counts for as
# long (then the gate is asked again before the move).
RECHECK_SECONDS = 5.0
REFUSAL_BYTES = 1024  # of a refusal's body read for its reason (the rest is not read)
REFUSAL_SHOWN = 200  # characters of it kept
# the metric's results: a 2xx, another answer, none in time, a failed connection, a destination
# the gate may not reach
PASSED, REFUSED, TIMEOUT, ERROR, BLOCKED = "passed", "refused", "timeout", "error", "blocked"


@dataclass(frozen=True)
class Answer:
    move: tuple[str, int]  # (fingerprint, step): the move it was asked about
    result: GateResult
    at: float  # on the steady clock


def request_body(spec: RolloutSpec, state: RolloutState, verdict: Verdict, gate: Gate) -> dict[str, Any]:
    """What a gate receives (JSON, POST): the move it guards and the analysis behind it."""
    to = spec.next_step(state.step)
    return {
        "rule": spec.rule,
        "canary": spec.canary,
        "baseline": spec.baseline,
        "before": gate.before,
        "phase": state.phase,
        "from": {"step": state.step, "weight": spec.steps[state.step].weight},
        "to": {"step": to, "weight": spec.steps[to].weight},
        "total_weight": spec.total,
        "verdict": verdict.outcome,
        "numbers": verdict.numbers(),
    }


async def ask(
    client: httpx.AsyncClient, gate: Gate, body: dict[str, Any], destinations: GateDestinations
) -> tuple[GateResult, str]:
    """One check of a gate, within its timeout (a total bound: resolving, connecting, sending
    and the answer's head): (its result, the metric's result label). The request goes to the
    address checked against `destinations`, never to another answer of the resolver."""
    try:
        async with asyncio.timeout(gate.timeout):
            url, headers, extensions = (await destinations.pin(gate.url)).request()
            async with client.stream(
                "POST", url, json=body, headers=headers, extensions=extensions
            ) as response:
                status = response.status_code
                if 200 <= status < 300:
                    return GateResult(True, f"HTTP {status}"), PASSED
                said = await _said(response)
                return GateResult(False, f"HTTP {status}" + (f": {said}" if said else "")), REFUSED
    except Refused as refused:
        return GateResult(False, f"destination refused: {refused}"), BLOCKED
    except TimeoutError:
        return GateResult(False, f"no answer within {gate.timeout:g}s"), TIMEOUT
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as error:
        return GateResult(False, f"no answer: {printable(str(error)) or type(error).__name__}"), ERROR


async def _said(response: httpx.Response) -> str:
    """The start of a refusal's body, as one printable line (a gate may say why)."""
    head = b""
    async for chunk in response.aiter_bytes():
        head += chunk
        if len(head) >= REFUSAL_BYTES:
            break
    return printable(head[:REFUSAL_BYTES].decode("utf-8", "replace"))


def printable(text: str) -> str:
    return re.sub(r"\s+", " ", "".join(c if c.isprintable() else " " for c in text)).strip()[:REFUSAL_SHOWN]


class GateChecks:
    """The gates' answers and the checks in flight, for the controller."""

    def __init__(
        self,
        metrics: Metrics,
        steady: Callable[[], float] = time.monotonic,
        recheck: float = RECHECK_SECONDS,
        destinations: GateDestinations | None = None,
    ) -> None:
        self.metrics = metrics
        self.destinations = destinations or GateDestinations()  # none: public addresses only
        self.steady = steady
        self.recheck = recheck
        self._answers: dict[tuple[str, int], Answer] = {}  # (rule, gate index) -> the last answer
        self._asking: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._client: httpx.AsyncClient | None = None

    def answers(self, rule: str, state: RolloutState) -> dict[int, GateResult]:
        """Each gate's last answer about the state's pending move: a pass while it is fresh
        (younger than the recheck pace), a refusal until the next answer."""
        move, now = (state.fingerprint, state.step), self.steady()
        return {
            index: answer.result
            for (name, index), answer in self._answers.items()
            if name == rule
            and answer.move == move
            and (not answer.result.passed or now - answer.at < self.recheck)
        }

    def ask(self, spec: RolloutSpec, state: RolloutState, verdict: Verdict, due: tuple[int, ...]) -> None:
        """Start a check of each gate in `due` (core.rollout.due_gates) that has no fresh
        answer about this move and none in flight."""
        move, now = (state.fingerprint, state.step), self.steady()
        for index in due:
            key = (spec.rule, index)
            answer = self._answers.get(key)
            if key in self._asking or (answer and answer.move == move and now - answer.at < self.recheck):
                continue
            gate = spec.gates[index]
            body = request_body(spec, state, verdict, gate)
            self._asking[key] = asyncio.create_task(self._check(key, move, gate, body))

    def checking(self, rule: str, index: int) -> bool:
        return (rule, index) in self._asking

    def last(self, rule: str, index: int) -> tuple[Answer, float] | None:
        """A gate's last answer (about whichever move) and its age in seconds, for reports."""
        answer = self._answers.get((rule, index))
        return (answer, max(0.0, self.steady() - answer.at)) if answer else None

    async def _check(
        self, key: tuple[str, int], move: tuple[str, int], gate: Gate, body: dict[str, Any]
    ) -> None:
        try:
            result, label = await ask(self._http(), gate, body, self.destinations)
        except Exception as error:  # a bug must not leave the gate "in flight" for ever
            log.exception("the check of the gate %s failed", shown_url(gate.url))
            result, label = GateResult(False, f"the check failed: {error}"), ERROR
        finally:
            self._asking.pop(key, None)
        previous = self._answers.get(key)
        self._answers[key] = Answer(move, result, self.steady())
        self.metrics.count_gate_check(key[0], gate.before, label)
        if previous is None or previous.result != result:
            log.info(
                "rollout %s: the gate before %s %s: %s",
                key[0],
                gate.before,
                shown_url(gate.url),
                result.detail,
            )

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # Each check bounds itself (asyncio.timeout); redirects are not followed: a 3xx
            # is an answer that is not 2xx. No proxy from the environment (the checked address
            # is the one connected to), and no connection kept: one made for a name's TLS
            # check is never reused for another name on the same address.
            self._client = httpx.AsyncClient(
                timeout=None,
                follow_redirects=False,
                trust_env=False,
                verify=httpx.create_ssl_context(trust_env=True),  # SSL_CERT_FILE / SSL_CERT_DIR
                limits=httpx.Limits(max_keepalive_connections=0),
            )
        return self._client

    async def close(self) -> None:
        """Cancel the checks in flight and close the client (the controller's end)."""
        await cancel_all(self._asking)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
