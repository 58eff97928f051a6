"""Synthetic requests that reach each rule, built from the rules' own match values: what a
change is tried on when there is no log of real requests (`graysteer diff --sample N`).

A condition whose values cannot be read off the rules (a regex, a version range, an
identity regex) is left out of that rule's request, so the request may miss the rule: the
diff says how many rules it could reach.
"""

from collections.abc import Sequence
from typing import Any

from sidecar.core.identity import NO_IDENTITY, Identity
from sidecar.core.table import Table

Sample = tuple[str, str, dict[str, str], Identity]  # method, path, headers, identity


def rule_requests(tables: Sequence[Table]) -> list[Sample]:
    """One request per rule of every table (duplicates dropped), and one that matches no
    condition, in that order."""
    seen: set[tuple[str, str, tuple[tuple[str, str], ...], str]] = set()
    out: list[Sample] = []
    for sample in [*(_request(rule.get("match") or {}) for t in tables for rule in _rules(t)), _blank()]:
        key = (sample[0], sample[1], tuple(sorted(sample[2].items())), sample[3].principal)
        if key not in seen:
            seen.add(key)
            out.append(sample)
    return out


def _rules(table: Table) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = table.document.get("rules") or []  # type: ignore[assignment]
    return rules


def _blank() -> Sample:
    return "GET", "/", {":authority": "graysteer.local"}, NO_IDENTITY


def _request(match: dict[str, Any]) -> Sample:
    method, path, headers, identity = _blank()
    headers = dict(headers)
    for name, form in (match.get("headers") or {}).items():
        value = _header_value(form)
        if value is not None:
            headers[name.lower()] = value
    route = match.get("path") or {}
    if "exact" in route or "prefix" in route:
        path = str(route.get("exact", route.get("prefix")))
    host = match.get("host")
    if host:
        headers[":authority"] = (host if isinstance(host, str) else host[0]).replace("*", "x")
    grpc = match.get("grpc")
    if grpc:
        method, path = "POST", f"/{grpc['service']}/{grpc.get('method', 'Any')}"
        headers["content-type"] = "application/grpc"
    methods = match.get("method")
    if methods:
        method = methods if isinstance(methods, str) else methods[0]
    form = match.get("identity") or {}
    spiffe = form.get("exact") or (form["glob"].replace("*", "x") if "glob" in form else None)
    if spiffe is None and "trust_domain" in form:
        spiffe = f"spiffe://{form['trust_domain']}/sample"
    if spiffe is not None:
        identity = Identity.from_sans(True, (spiffe,))
    elif "dns" in form:
        identity = Identity.from_sans(True, dns_sans=(form["dns"].replace("*", "x"),))
    return method.upper(), path, headers, identity


def _header_value(form: str | dict[str, Any]) -> str | None:
    if isinstance(form, str):
        return form
    if "exact" in form:
        return str(form["exact"])
    if "prefix" in form:
        return str(form["prefix"]) + "x"
    if form.get("present"):
        return "1"
    return None  # regex, semver, absent: not read off the rule
