"""Sticky lanes for visitors without an id, through the real Envoy in every mode (ext_proc,
ext_authz over gRPC and over HTTP, and Envoy's Lua with the fast path behind it): a visitor
without a key is issued one in a cookie, the backend sees it, and the visitor stays in its
lane while the canary ramps; fresh visitors split as the weights say; a real browser keeps a
page and its assets in one lane; a cookie that is no key of ours gets a fresh one."""

import http.client
import json
import re
import textwrap
from collections.abc import Callable, Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.admin import client as admin
from sidecar.core.bucketing import bucket
from sidecar.core.cookies import KEY_CHARS
from sidecar.dev.devstack import Stack
from sidecar.dev.processes import wait_for
from sidecar.envoyconf.generate import MODES, EnvoyOptions, bootstrap_document
from sidecar.table.load import load_rules
from tests.browser import chromium
from tests.lua_envoy import applied_version

RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: beta  # a cookie match condition: the header read in one form in every mode
        match: {headers: {cookie: "theme=dark; beta=1"}}
        route: canary
      - name: uid  # a cookie key source
        match: {path: {prefix: /uid}}
        split:
          key: [cookie:uid]
          seed: uid
          to: [{cluster: stable, weight: 50}, {cluster: canary, weight: 50}]
          when_key_missing: stable
      - name: web
        split:
          key: [header:x-user-id]
          seed: sticky
          to: [{cluster: stable, weight: 90}, {cluster: canary, weight: 10}]
          when_key_missing:
            assign: {cookie: gs_key, max_age: 7d, secure: false, same_site: lax, path: /}
    """)
COOKIE = "gs_key"
TOTAL = 100
FRESH_VISITORS = 2000
JARS = 8  # clients with a cookie jar, each 50 requests while the canary ramps 10 -> 50
RAMP = (10, 20, 30, 40, 50)


class Visitor:
    """One keep-alive connection to Envoy with a cookie jar of one cookie (or none)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.jar: dict[str, str] = {}

    def get(self, path: str = "/", cookie: str | None = None) -> tuple[str, str | None, dict[str, Any]]:
        """(backend, the Set-Cookie answered or None, what the backend received)."""
        headers = {}
        sent = cookie if cookie is not None else "; ".join(f"{k}={v}" for k, v in self.jar.items())
        if sent:
            headers["cookie"] = sent
        self.conn.request("GET", path, headers=headers)
        response = self.conn.getresponse()
        echo = response.read()
        assert response.status == 200, echo
        set_cookie = response.getheader("set-cookie")
        if set_cookie is not None:
            for name, morsel in SimpleCookie(set_cookie).items():
                self.jar[name] = morsel.value
        return str(response.getheader("x-backend")), set_cookie, json.loads(echo)

    def close(self) -> None:
        self.conn.close()


def lane_of(key: str, canary_weight: int) -> str:
    """Where the rules put `key` (flagd's bucketing: stable owns the low buckets)."""
    return "canary" if bucket("sticky", key, TOTAL) >= TOTAL - canary_weight else "stable"


def cookie_key(set_cookie: str) -> str:
    morsel = SimpleCookie(set_cookie)[COOKIE]
    return morsel.value


class Deployed(NamedTuple):
    stack: Stack
    mode: str

    @property
    def port(self) -> int:
        return self.stack.port

    @property
    def admin(self) -> str:
        assert self.stack.sidecar is not None
        return self.stack.sidecar.admin

    def set_canary(self, weight: int) -> None:
        """The canary's weight, set through the admin API; in envoy_decides, applied by Envoy's Lua."""
        table = admin.set_weights(self.admin, "web", {"stable": TOTAL - weight, "canary": weight})
        version = str(table["version"])
        if self.mode == "envoy_decides":
            envoy = self.stack.envoy
            assert envoy is not None
            wait_for(
                lambda: applied_version(envoy).startswith(version + "."), 10, f"Envoy to apply {version}"
            )

    def envoy_logs(self) -> tuple[int, int]:
        """Access log entries Envoy streamed to the sidecar and dropped (envoy_decides: the
        stream is bounded, and what a busy sidecar cannot take is dropped and counted, never
        waited for); (0, 0) in other modes."""
        if self.mode != "envoy_decides":
            return 0, 0
        assert self.stack.envoy is not None
        stats = self.stack.envoy.stats()
        prefix = "access_logs.grpc_access_log."
        return stats.get(prefix + "logs_written", 0), stats.get(prefix + "logs_dropped", 0)

    def settled(self) -> bool:
        """Every entry Envoy streamed has been read by the sidecar (entries are batched for
        up to a second): its counts include every request sent so far."""
        if self.mode != "envoy_decides":
            return True
        read = self.metric(
            "graysteer_access_log_entries_total", lambda labels: labels["result"] != "refused_inputs"
        )
        return read == self.envoy_logs()[0]

    def metric(self, name: str, chosen: Callable[[dict[str, str]], bool] = lambda _: True) -> float:
        """The sum of a sidecar metric's samples (those `chosen` by their labels)."""
        assert self.stack.sidecar is not None
        status, text = self.stack.sidecar.http_get("/metrics")
        assert status == 200
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and chosen(sample.labels)
        )

    def canary_weight(self) -> int:
        """The canary's weight in the rule `web` now."""
        rule = next(r for r in admin.status(self.admin)["rules"] if r["name"] == "web")
        return int(next(w["weight"] for w in rule["weights"] if w["cluster"] == "canary"))

    def issued_keys(self) -> float:
        """graysteer_issued_keys_total, summed over its labels, from the sidecar's /metrics."""
        return self.metric("graysteer_issued_keys_total")

    def lua_decided(self) -> int:
        """envoy_decides: the requests Envoy's Lua decided (its fast path's filter not run)."""
        assert self.stack.envoy is not None
        return self.stack.envoy.stats().get("http.ingress.ext_authz.disabled", 0)


@pytest.fixture(scope="module", params=MODES)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    mode = str(request.param)
    rules = tmp_path_factory.mktemp(mode) / "rules.yaml"
    rules.write_text(RULES)
    config = bootstrap_document(load_rules(rules), EnvoyOptions(mode=mode))
    with Stack(rules, config, rules.parent) as running:
        yield Deployed(running, mode)


def test_a_new_visitor_gets_a_key_the_backend_sees_and_a_cookie(stack: Deployed) -> None:
    stack.set_canary(50)
    visitor = Visitor(stack.port)
    try:
        before = stack.lua_decided()
        backend, set_cookie, echo = visitor.get("/first")
        assert set_cookie is not None
        key = cookie_key(set_cookie)
        assert KEY_CHARS.fullmatch(key)
        attributes = [part.strip() for part in set_cookie.split(";")[1:]]
        assert attributes == ["Max-Age=604800", "Path=/", "HttpOnly", "SameSite=Lax"]
        assert echo["headers"]["cookie"] == f"{COOKIE}={key}"  # the backend can log it
        assert backend == lane_of(key, 50)
        if stack.mode == "envoy_decides":  # the Lua decided, from x-request-id
            assert stack.lua_decided() == before + 1
            assert key == echo["headers"]["x-request-id"].replace("-", "")
        for _ in range(5):  # back with the cookie: the same lane, no new cookie
            again, set_again, echo = visitor.get("/again")
            assert (again, set_again) == (backend, None)
            assert echo["headers"]["cookie"] == f"{COOKIE}={key}"
    finally:
        visitor.close()


def test_fresh_visitors_split_as_the_weights_say(stack: Deployed) -> None:
    """2,000 visitors without a cookie at 10% canary: the canary's share within 3 points (the
    keys are random: 3 points is 4.5 standard deviations at 10%)."""
    stack.set_canary(10)
    visitor = Visitor(stack.port)
    wait_for(stack.settled, 15, "the earlier requests' access log entries read")
    counted, dropped = stack.issued_keys(), stack.envoy_logs()[1]
    keys = set()
    canary = 0
    try:
        for _ in range(FRESH_VISITORS):
            backend, set_cookie, _ = visitor.get("/", cookie="")
            assert set_cookie is not None
            key = cookie_key(set_cookie)
            assert backend == lane_of(key, 10)
            keys.add(key)
            canary += backend == "canary"
    finally:
        visitor.close()
    assert len(keys) == FRESH_VISITORS  # every visitor a key of its own
    assert abs(canary / FRESH_VISITORS - 0.10) <= 0.03, canary

    # counted in every mode (Envoy's Lua's keys from its access log stream, a moment later):
    # each key counted once, or its entry dropped by Envoy and counted there
    def accounted() -> float:
        return stack.issued_keys() - counted + stack.envoy_logs()[1] - dropped

    wait_for(lambda: stack.settled() and accounted() == FRESH_VISITORS, 15, "the issued keys counted")


def test_a_cookie_jar_keeps_its_lane_while_the_canary_ramps(stack: Deployed) -> None:
    """Each client, 50 requests while the weight goes 10 -> 50 in steps of 10: one key, no
    second cookie, and its lane moves at most once, from stable to canary, as its bucket says."""
    stack.set_canary(RAMP[0])
    visitors = [Visitor(stack.port) for _ in range(JARS)]
    lanes: list[list[str]] = [[] for _ in visitors]
    try:
        for step, weight in enumerate(RAMP):
            if step:
                stack.set_canary(weight)
            for _ in range(10):
                for number, visitor in enumerate(visitors):
                    backend, set_cookie, echo = visitor.get("/app")
                    first = not lanes[number]
                    assert (set_cookie is not None) == first
                    key = visitor.jar[COOKIE]
                    assert echo["headers"]["cookie"] == f"{COOKIE}={key}"
                    assert backend == lane_of(key, weight)
                    lanes[number].append(backend)
    finally:
        for visitor in visitors:
            visitor.close()
    for seen in lanes:
        assert len(seen) == 50
        moved = [i for i in range(1, 50) if seen[i] != seen[i - 1]]
        assert len(moved) <= 1 and all(seen[i - 1] == "stable" for i in moved), seen


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (f"{COOKIE}=canary", ""),  # a forged lane name: too short to be a key we issue
        (f"{COOKIE}=" + "A" * 65, ""),  # overlong
        (f"{COOKIE}=abc.def$ghi-jkl$mno-pqr-stu", ""),  # outside the allowed characters
        # `,` is no cookie-octet: it ends the pair (as between headers ext_authz joins), and
        # what follows is a piece of its own, passed on as the client sent it
        (f"{COOKIE}=abc.def,ghi-jkl$mno-pqr-stu", "ghi-jkl$mno-pqr-stu; "),
        (f'{COOKIE}="{"a" * 10}<script>{"b" * 10}"', ""),
        (f"{COOKIE}=" + "é" * 30, ""),
    ],
)
def test_a_cookie_that_is_no_key_gets_a_fresh_one(stack: Deployed, sent: str, kept: str) -> None:
    visitor = Visitor(stack.port)
    try:
        backend, set_cookie, echo = visitor.get("/", cookie=f"theme=dark; {sent}")
    finally:
        visitor.close()
    assert set_cookie is not None
    key = cookie_key(set_cookie)
    assert KEY_CHARS.fullmatch(key)
    assert echo["headers"]["cookie"] == f"theme=dark; {kept}{COOKIE}={key}"  # the bad value replaced
    weight = stack.canary_weight()
    assert backend == lane_of(key, weight)


def test_a_browser_keeps_a_page_and_its_assets_in_one_lane(stack: Deployed, tmp_path: Path) -> None:
    """Headless chromium loads a page and its two assets (three requests) five times with the
    canary at 50%: after the first load, every load is served by one lane."""
    stack.set_canary(50)
    loads: list[list[str]] = []
    set_cookies: list[str] = []
    with chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        served: list[str] = []

        def seen(response: Any) -> None:
            if re.search(r"/page\.(html|js|css)$", response.url):
                served.append(response.headers.get("x-backend", "?"))
                set_cookie = response.header_value("set-cookie")  # not in `headers`: security-related
                if set_cookie is not None:
                    set_cookies.append(set_cookie)

        page.on("response", seen)
        for _ in range(5):
            served.clear()
            page.goto(f"http://127.0.0.1:{stack.port}/page.html", wait_until="load")
            page.wait_for_function("document.documentElement.dataset.script !== undefined")
            loads.append(list(served))
        cookies = browser.cookies()
    assert all(len(load) == 3 for load in loads), loads
    after_first = {lane for load in loads[1:] for lane in load}
    assert len(after_first) == 1, loads
    assert len(set_cookies) == 1  # issued once, then sent back by the browser
    stored = [c for c in cookies if c["name"] == COOKIE]
    assert len(stored) == 1 and stored[0]["httpOnly"] and stored[0]["sameSite"] == "Lax"
    assert after_first == {lane_of(stored[0]["value"], 50)}


# Over HTTP/1.1 a client may send several `cookie` headers; Envoy's ext_authz (gRPC and HTTP)
# hands them on joined with `,` (`theme=dark,gs_key=canary`), ext_proc and the Lua see each one,
# and over HTTP/2 Envoy joins them with `; `. Every mode splits a cookie header at `;` and `,`
# (sidecar.core.cookies.cookie_pairs), so each reads the same pairs.
VALID = "K" * 22  # a key of the shape issued (tests choose it; a client may)
FORGED = f"{COOKIE}=canary"


@pytest.mark.parametrize("protocol", ["HTTP/2", "HTTP/1.1"])
@pytest.mark.parametrize(
    "headers",
    [
        ["theme=dark", FORGED],  # the forged value in the second header
        [FORGED, "theme=dark"],
        [f"theme=dark; {FORGED}", f"{COOKIE}=" + "A" * 65],  # forged in both
        ["theme=dark", f"a=b; {FORGED}", "c=d"],
    ],
)
def test_cookie_headers_each_with_a_forged_key_get_one_fresh_key(
    stack: Deployed, headers: list[str], protocol: str
) -> None:
    """HTTP/2 lets a client send several `cookie` headers (and an HTTP/1.1 client may, though
    RFC 6265 says one): a forged sticky cookie in any of them is replaced, and the backend gets
    the issued key alone, never the forged value."""
    status, set_cookie, echo = cookie_get(stack.port, headers, protocol)
    assert status == 200 and set_cookie is not None, echo
    key = cookie_key(set_cookie)
    assert KEY_CHARS.fullmatch(key)
    received = "; ".join(echo["cookies"])
    assert [p.strip() for p in received.split(";") if p.strip().startswith(f"{COOKIE}=")] == [
        f"{COOKIE}={key}"
    ]
    others = [p.strip() for h in headers for p in h.split(";") if not p.strip().startswith(f"{COOKIE}=")]
    assert [p.strip() for p in received.split(";") if not p.strip().startswith(f"{COOKIE}=")] == others
    weight = stack.canary_weight()
    assert echo["backend"] == lane_of(key, weight)


@pytest.mark.parametrize("protocol", ["HTTP/2", "HTTP/1.1"])
@pytest.mark.parametrize("headers", [["theme=dark", f"{COOKIE}={VALID}"], ["a=b", f"c=d; {COOKIE}={VALID}"]])
def test_a_key_in_a_later_cookie_header_is_honoured(
    stack: Deployed, headers: list[str], protocol: str
) -> None:
    status, set_cookie, echo = cookie_get(stack.port, headers, protocol)
    assert status == 200 and set_cookie is None, echo
    weight = stack.canary_weight()
    assert echo["backend"] == lane_of(VALID, weight)
    assert f"{COOKIE}={VALID}" in "; ".join(echo["cookies"])


UID = next(f"user{n}" for n in range(100) if bucket("uid", f"user{n}", TOTAL) >= TOTAL // 2)  # a canary key


@pytest.mark.parametrize("protocol", ["HTTP/2", "HTTP/1.1"])
@pytest.mark.parametrize("headers", [["theme=dark", f"uid={UID}"], ["a=b; c=d", f"uid={UID}; e=f"]])
def test_a_cookie_key_source_reads_a_later_cookie_header(
    stack: Deployed, headers: list[str], protocol: str
) -> None:
    """`cookie:uid` finds its key in any of the client's cookie headers (a request without
    it goes to stable, `when_key_missing: stable`)."""
    status, set_cookie, echo = cookie_get(stack.port, headers, protocol, "/uid")
    assert (status, set_cookie, echo["backend"]) == (200, None, "canary"), echo


@pytest.mark.parametrize("protocol", ["HTTP/2", "HTTP/1.1"])
@pytest.mark.parametrize("headers", [["theme=dark", "beta=1"], ["theme=dark,beta=1"], ["theme=dark;beta=1"]])
def test_a_cookie_match_condition_reads_the_header_in_one_form(
    stack: Deployed, headers: list[str], protocol: str
) -> None:
    """`cookie: "theme=dark; beta=1"` matches these pairs however the client sent them: in
    several headers, or one with `,` or `;` without a space."""
    status, set_cookie, echo = cookie_get(stack.port, headers, protocol)
    assert (status, set_cookie, echo["backend"]) == (200, None, "canary"), echo


def cookie_get(
    port: int, cookies: list[str], protocol: str, path: str = "/h2"
) -> tuple[int, str | None, dict[str, Any]]:
    """One request over `protocol` (HTTP/2: prior knowledge, as h2c) with each of `cookies` a
    `cookie` header of its own: (status, the Set-Cookie answered or None, the backend's echo)."""
    h2 = protocol == "HTTP/2"
    with httpx.Client(http1=not h2, http2=h2, timeout=10) as client:
        response = client.get(
            f"http://127.0.0.1:{port}{path}", headers=[("cookie", value) for value in cookies]
        )
        assert response.http_version == protocol
        return response.status_code, response.headers.get("set-cookie"), response.json()
