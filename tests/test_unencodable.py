"""Text that UTF-8 cannot encode (lone surrogates) never reaches a table, a request, a replay or
a hash, from any source: every string field of a rules document (YAML or the JSON pushed to
etcd), the state, command-line arguments, standard input and decision-log lines. mmh3 crashes
the process on such a string (SIGSEGV), so the commands run here in a child process: a crash is
exit status -11, never a clear error."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core import Problem, RulesError
from sidecar.core.bucketing import bucket
from sidecar.core.state import state_problems
from sidecar.core.text import header_text, is_encodable, unencodable
from sidecar.table.load import read_document
from sidecar.transports.explain import headers_message, read_log_line
from tests.table.test_reload import make_reloader
from tests.table.test_shadow import setup as shadow_setup

RICH = """\
version: 1
clusters: [stable, canary, v2]
default: stable
routing_header: x-route-cluster
mirror_header: x-mirror-cluster
trust:
  identities: [{trust_domain: example.org}, {glob: "spiffe://example.org/ns/qa/*"}]
  override_headers: [x-canary]
  xfcc: true
coloring:
  header: x-graysteer-lane
  baggage: graysteer.lane
  lanes: {stable: stable, canary: canary, v2: v2}
rules:
  - name: block-admin
    match: {path: {prefix: /admin}}
    deny: {status: 403, reason: "internal"}
  - name: beta
    match:
      headers: {x-user-tier: {regex: "beta-[0-9]+"}, x-client-version: {semver: ">=2.3.0"}}
      host: ["beta.*"]
      method: [GET]
    route: canary
  - name: cart
    match: {grpc: {service: shop.v1.Cart, method: Get}}
    route: v2
  - name: qa
    match: {identity: {exact: "spiffe://example.org/ns/qa/sa/tester"}}
    route: canary
  - name: ramp
    split:
      key: [header:x-user-id, cookie:uid, query:gid, identity]
      seed: checkout-2026
      to: [{cluster: stable, weight: 90}, {cluster: canary, weight: 10}]
      when_key_missing: random
"""
SURROGATE = "\ud800"


def leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], bool]]:
    """(path, is a key) of every string in a document."""
    found: list[tuple[tuple[Any, ...], bool]] = []
    if isinstance(value, str):
        found.append((path, False))
    elif isinstance(value, dict):
        for key, item in value.items():
            found.append(((*path, key), True))
            found += leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += leaves(item, (*path, index))
    return found


def spoiled(document: Any, path: tuple[Any, ...], key: bool) -> Any:
    """A copy of `document` with a lone surrogate added to the string (or key) at `path`."""
    copy = json.loads(json.dumps(document))
    parent = copy
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if key:
        parent[last + SURROGATE] = parent.pop(last)
    else:
        parent[last] = parent[last] + SURROGATE
    return copy


DOCUMENT = yaml.safe_load(RICH)
LEAVES = leaves(DOCUMENT)


def test_the_rich_document_is_valid_and_has_many_strings() -> None:
    read_document(RICH.encode(), "rich.yaml")
    assert len(LEAVES) > 60


@pytest.mark.parametrize("syntax", ["yaml", "json"])
def test_a_lone_surrogate_in_any_string_of_a_document_is_refused_naming_it(syntax: str) -> None:
    for path, key in LEAVES:
        document = spoiled(DOCUMENT, path, key)
        # json.dumps writes "\ud800" (ASCII); YAML reads the same escape in a quoted scalar
        content = (
            json.dumps(document)
            if syntax == "json"
            else yaml.safe_dump(document).replace("\\uD800", "\\ud800")
        )
        with pytest.raises(RulesError) as raised:
            read_document(content.encode(), f"doc.{syntax}")
        problems: tuple[Problem, ...] = raised.value.problems
        assert len(problems) == 1 and "U+D800" in problems[0].message, (path, problems)
        assert "is not UTF-8 text" in str(raised.value)


def test_unencodable_names_every_place_keys_included() -> None:
    found = list(unencodable({"a": [f"x{SURROGATE}", "ok"], f"k{SURROGATE}": {"b": 1}, "c": "\udcff"}))
    assert found == [(("a", 0), f"x{SURROGATE}"), ((), f"k{SURROGATE}"), (("c",), "\udcff")]
    assert is_encodable("plain ümlaut €") and not is_encodable("a\udcffb")


def test_a_state_with_a_lone_surrogate_is_refused() -> None:
    state = {"format": 1, "weight_overrides": {f"ramp{SURROGATE}": {"weights": {"canary": 5}, "base": {}}}}
    problems = state_problems(state)
    assert problems and "U+D800" in problems[0] and "weight_overrides" in problems[0]


def test_a_reload_and_a_shadow_refuse_it_and_keep_the_last_good_table(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(RICH)
    reloader = make_reloader(path)
    served = reloader.table
    path.write_text(RICH.replace("checkout-2026", '"\\ud800"'))
    result = asyncio.run(reloader.reload("watch"))
    assert result.outcome.name == "INVALID" and "U+D800" in result.error
    assert reloader.table is served
    with pytest.raises(ValueError, match="U\\+D800"):
        make_reloader(path)  # a restarted replica refuses it with a clear error, never crashes

    (tmp_path / "shadow").mkdir()
    upcoming, live, shadow, _ = shadow_setup(tmp_path / "shadow")
    asyncio.run(live.reload("watch"))
    first = shadow.table
    assert first is not None
    upcoming.write_text(RICH.replace("checkout-2026", '"\\ud800"'))
    asyncio.run(live.reload("watch"))
    assert shadow.table is first and "U+D800" in shadow.status().error


def graysteer(*argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The command line in a child process (LC_ALL=C: stdin and argv decoded with surrogateescape)."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONIOENCODING": ""}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *argv], input=stdin, capture_output=True, env=env, timeout=60
    )


@pytest.fixture
def seeded(tmp_path: Path) -> Path:
    path = tmp_path / "seed.yaml"
    path.write_text(RICH.replace("checkout-2026", '"\\ud800"'))
    return path


def test_check_explain_and_diff_refuse_the_document_instead_of_crashing(seeded: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(RICH)
    for argv in (
        ["check", str(seeded)],
        ["explain", "--config", str(seeded), "-H", "x-user-id: u1"],
        ["diff", str(good), str(seeded)],
    ):
        done = graysteer(*argv)
        assert done.returncode == 1, (argv, done.returncode, done.stderr)
        assert b"split.seed" in done.stderr and b"U+D800" in done.stderr, argv


def test_arguments_that_are_not_utf8_are_refused_by_name(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(RICH)
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "explain", "--config", str(good), "-H", b"x-user-id: u\xff"],
        capture_output=True,
        env={**os.environ, "LC_ALL": "C"},
        timeout=60,
    )
    assert done.returncode == 2 and b"argument 5" in done.stderr and b"U+DCFF" in done.stderr


def test_a_decision_log_line_holding_a_lone_surrogate_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(RICH)
    line = json.dumps(
        {"method": "GET", "path": "/", "headers": {"x-user-id": "u\ud800"}, "decision": {"cluster": "stable"}}
    )
    assert "\\ud800" in line
    with pytest.raises(ValueError):
        read_log_line(line)
    done = graysteer("explain", "--config", str(good), "--from-log", "-", stdin=line.encode() + b"\n")
    assert done.returncode == 1 and b"not a decision log line" in done.stderr, done.stderr
    # bytes that are not UTF-8 on stdin are read as U+FFFD, whatever the locale
    raw = line.replace("\\ud800", "").encode().replace(b'"u"', b'"u\xff"')
    done = graysteer("explain", "--config", str(good), "--from-log", "-", stdin=raw + b"\n")
    assert done.returncode in (0, 1) and b"Traceback" not in done.stderr, done.stderr


@given(st.binary(max_size=40))
def test_header_bytes_become_encodable_text_as_envoy_reads_them(raw: bytes) -> None:
    text = header_text(raw)
    assert is_encodable(text)
    # byte for byte as sent, each byte that is not part of valid UTF-8 read as "!"
    encoded = text.encode()
    assert len(encoded) == len(raw) and all(
        got in (sent, ord("!")) for got, sent in zip(encoded, raw, strict=True)
    )
    try:
        assert text == raw.decode("utf-8")  # valid UTF-8 is read as it is
    except UnicodeDecodeError:
        assert "!" in text
    bucket("seed", text, 100)  # the hash takes it


@given(st.text(alphabet=st.characters(categories=["Cs", "Ll", "Nd"]), max_size=12))
def test_the_hash_raises_on_a_lone_surrogate_instead_of_crashing(text: str) -> None:
    if is_encodable(text):
        assert 0 <= bucket("s", text, 100) < 100
    else:
        with pytest.raises(UnicodeEncodeError):
            bucket("s", text, 100)


def test_explain_builds_no_message_from_text_it_cannot_encode() -> None:
    with pytest.raises(UnicodeEncodeError):
        headers_message("GET", "/", [("x-user-id", f"u{SURROGATE}")])


def test_diff_counts_a_log_line_holding_a_lone_surrogate_as_unreadable(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(RICH)
    line = {
        "method": "GET",
        "path": "/",
        "headers": {"x-user-id": "u\ud800"},
        "decision": {"cluster": "stable"},
    }
    fine = {**line, "headers": {"x-user-id": "u1"}}
    log = tmp_path / "decisions.jsonl"
    log.write_text(json.dumps(line) + "\n" + json.dumps(fine) + "\n")
    for source in (str(log), "-"):
        done = graysteer("diff", str(good), str(good), "--requests", source, "--json", stdin=log.read_bytes())
        assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
        report = json.loads(done.stdout)
        assert report["requests"] == 1 and report["read"]["unreadable_lines"] == 1, report["read"]
