"""Running a rollout's metric checks (sidecar.core.metric_checks) against Prometheus
(`serve --prometheus URL`), never on the controller's tick: each rollout's checks run as one
background task at a time, started by the tick on the rollout's poll, every query bounded
by its check's timeout (Prometheus is told the same timeout). The tick judges on the last
completed run; until there is one, and whenever a query fails, times out or gives no
single finite value, the check is inconclusive with the reason (never a pass).

Only the process that moves rollouts (a fleet's leader) asks: the others show that the
leader queries."""

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from sidecar.core.gates import shown_url
from sidecar.core.metric_checks import (
    ERROR,
    INCONCLUSIVE,
    NO_DATA,
    TIMEOUT,
    Answer,
    MetricCheck,
    MetricResult,
    fill,
    judge_metric,
)
from sidecar.core.rollout import RolloutSpec
from sidecar.ops.metrics import Metrics
from sidecar.rollouts.gates import printable
from sidecar.rollouts.tasks import cancel_all
from sidecar.tlsfiles import certificates

log = logging.getLogger("graysteer.rollout")
ERROR_SHOWN = 200  # characters of Prometheus' error message kept
# An instant query's answer is one sample: a few hundred bytes. Past this it is not read on
# (a hostile or broken server cannot fill memory, nor hold the loop parsing it).
MAX_ANSWER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class PrometheusTarget:
    """Where and how to query: the server's URL (a path prefix kept), a file holding a bearer
    token (read at every query: a rotated token is used at once), a CA for its TLS."""

    url: str
    token_file: Path | None = None
    ca: Path | None = None


class Prometheus:
    """Prometheus' HTTP API, instant queries only."""

    def __init__(self, target: PrometheusTarget) -> None:
        self.target = target
        self.shown = shown_url(target.url)
        # No redirects (the token would follow), no proxy from the environment.
        verify: ssl.SSLContext | bool = ca_context(target.ca) if target.ca else True
        self._client = httpx.AsyncClient(timeout=None, follow_redirects=False, trust_env=False, verify=verify)

    async def query(self, promql: str, timeout: float) -> Answer:
        """One instant query, within `timeout` seconds in all (a slow drip included): its one
        finite value, or why none. An answer over MAX_ANSWER_BYTES is not read further."""
        try:
            async with asyncio.timeout(timeout):
                request = self._client.build_request(
                    "POST",
                    self.target.url.rstrip("/") + "/api/v1/query",
                    data={"query": promql, "timeout": f"{timeout:g}s"},
                    headers=self._headers(),
                )
                response = await self._client.send(request, stream=True)
                try:
                    body = await _read_bounded(response)
                finally:
                    await response.aclose()
            if body is None:
                return Answer(
                    None, ERROR, f"Prometheus {self.shown}: an answer over {MAX_ANSWER_BYTES} bytes"
                )
            return _answer(response.status_code, body)
        except TimeoutError:
            return Answer(None, TIMEOUT, f"no answer from Prometheus within {timeout:g}s")
        except (httpx.HTTPError, OSError, ValueError) as error:
            said = printable(str(error))[:ERROR_SHOWN] or type(error).__name__
            return Answer(None, ERROR, f"Prometheus {self.shown}: {said}")

    def _headers(self) -> dict[str, str]:
        if self.target.token_file is None:
            return {}
        token = read_token(self.target.token_file)  # OSError, ValueError: the query fails, said
        return {"authorization": f"Bearer {token}"}

    async def close(self) -> None:
        await self._client.aclose()


def read_token(path: Path) -> str:
    """The bearer token in `path`: OSError when it cannot be read, ValueError when it is empty
    or not one line of visible ASCII (it goes into an HTTP header as it is)."""
    token = path.read_bytes().strip()
    if not token:
        raise ValueError("the token file is empty")
    if not all(0x21 <= byte <= 0x7E for byte in token):
        raise ValueError("the token is not one line of visible ASCII characters")
    return token.decode("ascii")


def ca_context(path: Path) -> ssl.SSLContext:
    """A client TLS context trusting the CA certificates in `path`: OSError when it cannot be
    read, ValueError when it holds no PEM certificate that OpenSSL takes."""
    try:
        certificates(path.read_bytes(), path)
        return ssl.create_default_context(cafile=str(path))
    except ValueError:
        raise ValueError("no PEM certificate (a CA bundle: -----BEGIN CERTIFICATE-----)") from None
    except ssl.SSLError as error:
        raise ValueError(f"not a CA bundle OpenSSL accepts ({error.reason or error})") from None


async def _read_bounded(response: httpx.Response) -> bytes | None:
    """The answer's body, or None past MAX_ANSWER_BYTES (read no further)."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            return None
    return bytes(body)


def _answer(status: int, content: bytes) -> Answer:
    """One finite value of an instant query's answer, or why none. Anything not in the shape
    Prometheus' API documents (an object where a list is, a value that is not a string) is
    an error, never a number: orjson reads the JSON (nesting bounded, no recursion)."""
    try:
        body: Any = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict) or status != 200 or body.get("status") != "success":
        said = body.get("error") if isinstance(body, dict) else None
        text = said if isinstance(said, str) else content[:ERROR_SHOWN].decode("utf-8", "replace")
        return Answer(None, ERROR, f"Prometheus answered HTTP {status}: {printable(text)[:ERROR_SHOWN]}")
    data = body.get("data")
    kind, result = (data.get("resultType"), data.get("result")) if isinstance(data, dict) else (None, None)
    if kind == "scalar":
        samples = [result]
    elif kind == "vector" and isinstance(result, list):
        samples = [sample.get("value") if isinstance(sample, dict) else None for sample in result]
    else:
        shown = printable(str(kind))[:40]
        return Answer(None, ERROR, f"the query gives a {shown}, not a number (an instant vector or scalar)")
    if not samples:
        return Answer(None, NO_DATA, "no sample (no series matches in the window)")
    if len(samples) > 1:
        return Answer(None, NO_DATA, f"{len(samples)} series, not one: aggregate them (sum, avg, ...)")
    sample = samples[0]
    try:  # [timestamp, "value"]: the value is always a string in Prometheus' API
        if not (isinstance(sample, list) and len(sample) == 2 and isinstance(sample[1], str)):
            raise ValueError
        value = float(sample[1])
    except ValueError:
        return Answer(None, ERROR, "Prometheus answered a sample that is not a number")
    if not math.isfinite(value):
        return Answer(None, NO_DATA, f"the value is {value} (no traffic in the window?)")
    return Answer(value)


@dataclass(frozen=True)
class Run:
    fingerprint: str
    results: tuple[MetricResult, ...]
    at: float  # on the steady clock


class MetricQueries:
    """The rollouts' metric checks: the last completed run per rule, and the runs in flight."""

    def __init__(
        self,
        metrics: Metrics,
        prometheus: Prometheus | None,
        steady: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.prometheus = prometheus
        self.steady = steady
        self._runs: dict[str, Run] = {}
        self._running: dict[str, asyncio.Task[None]] = {}

    def ask(self, spec: RolloutSpec) -> None:
        """Start a run of the rollout's checks unless one is in flight (the leader's tick)."""
        checks = spec.analysis.metrics
        if not checks or self.prometheus is None or spec.rule in self._running:
            return
        self._running[spec.rule] = asyncio.create_task(self._run(spec, self.prometheus))

    def results(self, spec: RolloutSpec) -> tuple[MetricResult, ...]:
        """The checks' results for the controller's verdict: the last run's for this version of
        the rollout; inconclusive while there is none."""
        checks = spec.analysis.metrics
        if not checks:
            return ()
        run = self._runs.get(spec.rule)
        if run is not None and run.fingerprint == spec.fingerprint:
            return run.results
        why = "no Prometheus to query (serve --prometheus URL)" if self.prometheus is None else "querying"
        return tuple(MetricResult(c, INCONCLUSIVE, f"metric {c.name}: {why}", result=ERROR) for c in checks)

    def age(self, rule: str) -> float | None:
        run = self._runs.get(rule)
        return None if run is None else max(0.0, self.steady() - run.at)

    async def _run(self, spec: RolloutSpec, prometheus: Prometheus) -> None:
        checks = spec.analysis.metrics
        try:
            results = await asyncio.gather(*(self._check(spec, c, prometheus) for c in checks))
        except Exception:  # a bug must not leave the run "in flight" for ever, nor an old pass
            log.exception("the metric checks of %s failed", spec.rule)
            why = "the checks failed (see the sidecar's log)"
            results = [MetricResult(c, INCONCLUSIVE, f"metric {c.name}: {why}", result=ERROR) for c in checks]
        finally:
            self._running.pop(spec.rule, None)
        previous = self._runs.get(spec.rule)
        self._runs[spec.rule] = Run(spec.fingerprint, tuple(results), self.steady())
        for result in results:
            label = result.result if result.outcome == INCONCLUSIVE else result.outcome
            self.metrics.count_metric_check(spec.rule, result.check.name, label)
            self.metrics.show_metric_value(spec.rule, result.check.name, result.value)
            before = (
                next((r for r in previous.results if r.check == result.check), None) if previous else None
            )
            if before is None or (before.outcome, before.result) != (result.outcome, result.result):
                dry = " (dry run)" if result.check.dry_run else ""
                log.info("rollout %s: %s%s", spec.rule, result.reason, dry)

    async def _check(self, spec: RolloutSpec, check: MetricCheck, prometheus: Prometheus) -> MetricResult:
        window = spec.analysis.window
        asked = [prometheus.query(fill(check.query, spec.canary, spec.baseline, window), check.timeout)]
        if check.compares:
            asked.append(
                prometheus.query(fill(check.query, spec.baseline, spec.baseline, window), check.timeout)
            )
        answers = await asyncio.gather(*asked)
        return judge_metric(check, answers[0], answers[1] if check.compares else None)

    async def close(self) -> None:
        """Cancel the runs in flight and close the client (the controller's end)."""
        await cancel_all(self._running)
        if self.prometheus is not None:
            await self.prometheus.close()
