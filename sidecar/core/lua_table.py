"""A table as a Lua HTTP filter for Envoy: the decision taken inside Envoy, exactly as the core.

`lua_source(table, names)` writes one Lua program (sidecar.core.lua_runtime's helpers, the
table's rules as a chain of `if` tests on the request, its trust and coloring) that steers a
request as `steer` does: the trust strip, deny rules, a trusted caller's lane, the rules
(header, path, host, method, gRPC and identity conditions; routes, splits with flagd's
bucketing, mirrors, denies), the routing, mirror, lane and baggage headers, and the
decision's fields as dynamic metadata where the access log and traces read them.

What the Lua cannot decide exactly is never approximated: it raises UNDECIDED before
touching the request, and the request is marked (dynamic metadata `names.mark_namespace` /
`names.mark_key` = true) for an ext_authz filter that runs only on that mark and asks the
sidecar's fast path, which decides as every other mode. That is: RE2 regexes and version
ranges (when the rule is reached and the header present), a version header's value that is
not plainly MAJOR.MINOR.PATCH (its `malformed_version` is the fast path's to count),
`x-forwarded-client-cert` when the table trusts it, input that is not UTF-8 or whose edge
holds a Unicode space Python strips, a `baggage` header with a control character (or protected itself), and
any table whose rules the generator does not know (every request then goes to the sidecar:
`lua_source(...).decides` is False).

Every string taken from the table is written as an escaped Lua literal (`lua_string`):
nothing in a rules file is ever Lua code.
"""

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.core import lua_cookies
from sidecar.core.chain import KNOWN_RULE_FIELDS, MAX_GENERATED_RULES, _known
from sidecar.core.hosts import split_port
from sidecar.core.identity import parse_spiffe_id
from sidecar.core.lua_runtime import RUNTIME
from sidecar.core.model import DECISION_FIELDS, Decision
from sidecar.core.table import MIRROR_BUCKETS, Mirror, Rule, Split, Table

LUA_ERROR_KEY = "lua_error"  # beside the mark: the Lua failed on the request (a bug), logged by Envoy
# Where the Lua files a decided request's inputs, when the sidecar asks for them (`capture`):
# a namespace of its own, so the decision's metadata stays the same from request to request.
INPUTS_NAMESPACE = "graysteer.request"
INPUTS_KEY = "in"
INPUTS_FORMAT = "1"  # the first field of the inputs: their layout (capture_inputs)
# Beside the inputs, only on a request where one happens: the steering events the Lua met,
# their names joined by `,` (sidecar.transports.access_log counts them).
EVENTS_KEY = "events"
EVENTS = frozenset(
    (
        "untrusted_headers_removed",
        "baggage_over_limit",
        "malformed_spiffe_id",
        "malformed_dns_san",
        "malformed_xfcc",
        "malformed_baggage",
        "malformed_lane",
    )
)
CHUNK_RULES = 100  # rules per Lua function: LuaJIT bounds a function's constants and jumps
MAX_EXACT_TOTAL = 1 << 36  # the Lua bucketing is exact below this total weight
# Header names the fast path does not read as the request has them: the check's own
# (sidecar.transports.http_check), the peer and port headers Envoy adds to it, `host` (read
# as `:authority`) and the pseudo-headers. A condition on one is left to the sidecar.
UNREAD_HEADERS = frozenset(
    (
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "x-envoy-internal",
        "x-envoy-expected-rq-timeout-ms",
        "x-graysteer-listener-port",
        "x-graysteer-peer-uri-sans",
        "x-graysteer-peer-dns-sans",
        "host",
    )
)
_METADATA_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class LuaNames:
    """Where the Lua files what it decided, and how it marks what it leaves to the sidecar."""

    namespace: str  # dynamic metadata namespace of the decision's fields
    key_prefix: str  # prepended to each field name (`_` written `-`)
    mark_namespace: str
    mark_key: str


@dataclass(frozen=True)
class LuaFilter:
    source: str
    decides: bool  # False: the table's rules are not generated; every request is marked


def lua_string(text: str) -> str:
    """`text` as a Lua string literal: its UTF-8 bytes, printable ASCII as itself (but `"`
    and `\\`), every other byte as a decimal escape. Never closes early, never runs."""
    out = []
    for b in text.encode("utf-8"):
        if 32 <= b < 127 and b not in (34, 92):
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return '"' + "".join(out) + '"'


def _lua(value: object) -> str:
    """A Lua literal for a plain value (str, bool, int, None, list, dict of those)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return lua_string(value)
    if isinstance(value, list | tuple):
        return "{" + ", ".join(_lua(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Lua literal for {type(value).__name__}")


def mark_everything(names: LuaNames) -> str:
    """The filter before the first table (and for a table not generated): every request is
    marked for the sidecar, nothing decided without the table."""
    return (
        "function envoy_on_request(handle)\n"
        f"  handle:streamInfo():dynamicMetadata():set({lua_string(names.mark_namespace)}, "
        f"{lua_string(names.mark_key)}, true)\n"
        "end\n"
    )


def lua_source(table: Table, names: LuaNames, capture: Sequence[str] = ()) -> LuaFilter:
    """The Lua filter deciding `table` (see the module docstring). With `capture` (header
    names), each request the Lua decides also carries its inputs as dynamic metadata
    (`capture_inputs`); without, nothing more is written."""
    documents = _documents(table)
    if documents is None or not _steerable(table):
        return LuaFilter(mark_everything(names), False)
    program = _Program()
    chunks = []
    for start in range(0, len(documents), CHUNK_RULES):
        chunks.append(
            program.chunk(table.rules[start : start + CHUNK_RULES], documents[start : start + CHUNK_RULES])
        )
    deny_indexes = [
        i for i, rule in enumerate(table.rules) if rule.route is not None and rule.route.deny_status
    ]
    denies = program.chunk([table.rules[i] for i in deny_indexes], [documents[i] for i in deny_indexes])
    parts = [
        RUNTIME,
        lua_cookies.runtime(table),
        "pcall(function() math.randomseed(os.time()) end)",
        *program.functions,
        _chain("decide", chunks, f"DEFAULT = {_lua(_fields(table.default_decision))}"),
        _chain("denied", [denies], "DEFAULT = nil"),
        _settings(table, names, program),
        capture_inputs(capture),
        STEERING,
        lua_cookies.response_handler(table),
    ]
    return LuaFilter("\n".join(parts), True)


def _documents(table: Table) -> list[dict[str, Any]] | None:
    """The rules' documents, when the generator knows every one (as sidecar.core.chain)."""
    documents = table.document.get("rules") if isinstance(table.document, dict) else None
    documents = documents or []
    if not isinstance(documents, list) or len(documents) != len(table.rules):
        return None
    if len(table.rules) > MAX_GENERATED_RULES:
        return None
    if tuple(f.name for f in dataclasses.fields(Rule)) != KNOWN_RULE_FIELDS:
        return None
    for document, rule in zip(documents, table.rules, strict=True):
        if not isinstance(document, dict) or document.get("name") != rule.name or not _known(document):
            return None
    return documents


def _steerable(table: Table) -> bool:
    """Whether the steering's own headers can be set one by one (no two share a name)."""
    named = [table.routing_header, table.mirror_header]
    if table.coloring is not None:
        named.append(table.coloring.header)
        if table.coloring.baggage:
            named.append("baggage")
    return len(set(named)) == len(named) and set(DECISION_FIELDS) >= {"cluster", "rule", "reason"}


def _chain(name: str, chunks: Sequence[str], default: str) -> str:
    lines = [f"local {name}", "do", f"  local {default}", f"  {name} = function(r)"]
    for chunk in chunks:
        lines += [f"    local d = {chunk}(r)", "    if d ~= nil then return d end"]
    return "\n".join([*lines, "    return DEFAULT", "  end", "end"])


def _fields(decision: Decision) -> dict[str, object]:
    """A fixed decision as the Lua's decision table."""
    fields: dict[str, object] = {
        "cluster": decision.cluster,
        "rule": decision.rule,
        "reason": str(decision.reason),
    }
    if decision.deny_status is not None:
        fields["deny_status"] = decision.deny_status
        fields["deny_reason"] = decision.deny_reason or ""
        if metadata_text(decision.deny_reason or "") != (decision.deny_reason or ""):
            fields["meta_reason"] = metadata_text(decision.deny_reason or "")
    return fields


class _Program:
    """The generated functions: one per chunk of rules, each with its own constants."""

    def __init__(self) -> None:
        self.functions: list[str] = []

    def chunk(self, rules: Sequence[Rule], documents: Sequence[dict[str, Any]]) -> str:
        name = f"chunk{len(self.functions)}"
        constants: list[str] = []
        body: list[str] = []
        for rule, document in zip(rules, documents, strict=True):
            tests = [*_conditions(document.get("match") or {}, constants)]
            action = _action(rule, constants)
            if tests:
                body.append(f"    if {' and '.join(f'({t})' for t in tests)} then {action} end")
            else:
                body.append(f"    do {action} end")
                break  # a rule without conditions: nothing after it is reached
        self.functions.append(
            "\n".join(
                [
                    f"local {name} = (function()",
                    f"  local K = {{{', '.join(constants)}}}",
                    "  return function(r)",
                    "    local id = r.id",
                    *body,
                    "    return nil",
                    "  end",
                    "end)()",
                ]
            )
        )
        return name

    def identity_test(self, form: Mapping[str, Any], constants: list[str]) -> str:
        return _identity(form, constants, "id")


def _constant(constants: list[str], value: object) -> str:
    constants.append(_lua(value))
    return f"K[{len(constants)}]"


def _action(rule: Rule, constants: list[str]) -> str:
    if rule.route is not None:
        route = _constant(constants, _fields(rule.route))
        if rule.mirror is None:
            return f"return {route}"
        return f"return mirror_route({route}, {_constant(constants, _mirror(rule.mirror))})"
    assert rule.split is not None
    if rule.split.bounds[-1] >= MAX_EXACT_TOTAL or rule.split.bounds[-1] <= 0:
        return "und()"
    splits = "assigned_split" if rule.split.assign is not None else "split"  # lua_cookies
    return f"return {splits}(r, {_constant(constants, _split(rule.split, rule.mirror))})"


def _mirror(mirror: Mirror) -> dict[str, object]:
    return {"cluster": mirror.cluster, "share": mirror.share, "seed": mirror.seed}


def _split(split: Split, mirror: Mirror | None) -> dict[str, object]:
    keys = []
    for label, _ in split.keys:
        kind, _, name = label.partition(":")
        if label == "identity":
            keys.append([4, "", label])
        elif kind == "header":
            keys.append([1, name.lower(), label])
        else:
            keys.append([2 if kind == "cookie" else 3, name, label])
    spec: dict[str, object] = {
        "rule": split.rule,
        "seed": split.seed,
        "total": split.bounds[-1],
        "bounds": list(split.bounds),
        "clusters": list(split.clusters),
        "keys": keys,
        "missing": split.when_key_missing,
    }
    if mirror is not None:
        spec["mirror"] = _mirror(mirror)
    if split.assign is not None:
        spec["assign"] = lua_cookies.assign_spec(split.assign)
    assert MIRROR_BUCKETS == 10_000  # written into the runtime
    return spec


# ---- conditions (as sidecar.core.compile._conditions, in the same order) ---------------------


def _conditions(match: Mapping[str, Any], constants: list[str]) -> Iterable[str]:
    for header, form in (match.get("headers") or {}).items():
        yield _header(header.lower(), form, constants)
    if "path" in match:
        form = match["path"]
        if "exact" in form:
            yield f"r.path == {_constant(constants, form['exact'])}"
        elif "prefix" in form:
            yield f"startswith(r.path, {_constant(constants, form['prefix'])})"
        else:
            yield "und()"  # an RE2 regex
    if "identity" in match:
        yield _identity(match["identity"], constants, "id")
    if "host" in match:
        hosts = match["host"]
        spec = _constant(constants, _host_spec([hosts] if isinstance(hosts, str) else hosts))
        yield f"hostm({spec}, hd(r, ':authority'))"
    if "grpc" in match:
        yield _grpc(match["grpc"], constants)
    if "method" in match:
        methods = match["method"]
        allowed = {m.upper(): True for m in ([methods] if isinstance(methods, str) else methods)}
        yield f"{_constant(constants, allowed)}[method(r)] == true"


def _header(name: str, form: str | dict[str, Any], constants: list[str]) -> str:
    if isinstance(form, str):
        form = {"exact": form}
    if name in UNREAD_HEADERS or name.startswith(":"):
        return "und()"
    n = lua_string(name)
    if "exact" in form:
        value = form["exact"]
        return f"hd(r, {n}) == {_constant(constants, value)}" if type(value) is str else "false"
    if "prefix" in form:
        return f"startswith(hd(r, {n}) or '', {_constant(constants, form['prefix'])})"
    if "regex" in form or "semver" in form:
        return f"hd(r, {n}) ~= nil and und()"  # decided by the sidecar when present
    if form.get("present"):
        return f"hd(r, {n}) ~= nil"
    return f"hd(r, {n}) == nil"


def _grpc(form: Mapping[str, str], constants: list[str]) -> str:
    service = f"/{form['service']}/"
    if "method" in form:
        return f"r.path == {_constant(constants, service + form['method'])}"
    s = _constant(constants, service)
    return f"startswith(r.path, {s}) and not string.find(r.path, '/', {len(service.encode()) + 1}, true)"


def _identity(form: Mapping[str, Any], constants: list[str], id_name: str) -> str:
    if "exact" in form:
        exact = parse_spiffe_id(str(form["exact"]))
        return "false" if exact is None else f"{id_name}.spiffe == {_constant(constants, str(exact))}"
    if "glob" in form:
        return f"globm({_constant(constants, str(form['glob']).split('*'))}, {id_name}.spiffe)"
    if "trust_domain" in form:
        return f"{id_name}.td == {_constant(constants, str(form['trust_domain']))}"
    if "regex" in form:
        return f"{id_name}.spiffe ~= nil and und()"
    if "dns" in form:
        pattern = str(form["dns"]).translate(_ASCII_LOWER)
        return f"dnsm({_constant(constants, pattern)}, {id_name})"
    if form.get("present"):
        return f'{id_name}.principal ~= ""'
    return f'{id_name}.principal == ""'


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _host_spec(patterns: Sequence[str]) -> dict[str, object]:
    """sidecar.core.hosts.host_matcher's sets, for the runtime's `hostm`."""
    exact: dict[str, bool] = {}
    with_port: dict[str, bool] = {}
    suffixes: list[list[object]] = []
    prefixes: list[str] = []
    any_host = False
    for pattern in (p.lower() for p in patterns):
        if pattern == "*":
            any_host = True
        elif pattern.startswith("*"):
            suffixes.append([pattern[1:], split_port(pattern[1:])[1] is not None])
        elif pattern.endswith("*"):
            prefixes.append(pattern[:-1])
        elif split_port(pattern)[1] is not None:
            with_port[pattern] = True
        else:
            exact[pattern] = True
    if any(not p.isascii() for p in patterns):
        return {"any": False, "unread": True}
    return {
        "any": any_host,
        "exact": exact,
        "with_port": with_port,
        "suffixes": suffixes,
        "prefixes": prefixes,
    }


# ---- the table's settings and the steering ---------------------------------------------------


def _settings(table: Table, names: LuaNames, program: _Program) -> str:
    trust, coloring = table.trust, table.coloring
    constants: list[str] = []
    trusts = [program.identity_test(form, constants) for form in _trust_forms(table)]
    lanes: dict[str, str] = {}
    settings: dict[str, object] = {
        "version": table.version,
        "routing": table.routing_header,
        "mirror_header": table.mirror_header,
        "protected": sorted(trust.protected),
        "plaintext": trust.plaintext,
        "ports": {port: True for port in sorted(trust.listener_ports)},
        "any_port": bool(trust.listener_ports),
        "xfcc": trust.xfcc,
        # headers left to the sidecar when present: baggage named as an override header (the
        # core strips it twice over)
        "bail": ["baggage"] if coloring and coloring.baggage and "baggage" in trust.protected else [],
        # headers a `semver` condition reads: a value not plainly a version (`malformed_version`
        # or a pre-release) is left to the sidecar, which reads versions as the core does
        "versions": sorted(table.version_headers),
        "ns": names.namespace,
        "prefix": names.key_prefix,
        "mark_ns": names.mark_namespace,
        "mark_key": names.mark_key,
        "error_key": LUA_ERROR_KEY,
        "events_ns": INPUTS_NAMESPACE,
        "events_key": EVENTS_KEY,
        "keys": {
            field: names.key_prefix + field.replace("_", "-")
            for field in (*DECISION_FIELDS, lua_cookies.SET_COOKIE_FIELD)
        },
    }
    if coloring is not None:
        lanes = dict(coloring.lanes)
        settings.update(color=coloring.header, lanes=lanes, color_fallback=coloring.fallback)
        settings["lane_of"] = dict(coloring.lane_of)
        if coloring.baggage:
            settings["baggage_key"] = coloring.baggage
    test = " or ".join(f"({t})" for t in trusts) or "false"
    return "\n".join(
        [
            "local T = (function()",
            f"  local K = {{{', '.join(constants)}}}",
            f"  local T = {_lua(settings)}",
            f"  T.trusts = function(id) return {test} end",
            "  return T",
            "end)()",
        ]
    )


def _trust_forms(table: Table) -> list[dict[str, Any]]:
    trust = table.document.get("trust") if isinstance(table.document, dict) else None
    forms = (trust or {}).get("identities") or [] if isinstance(trust, dict) else []
    return [form for form in forms if isinstance(form, dict)]


def capture_inputs(names: Sequence[str]) -> str:
    """`CAPTURE`: nil, or the function that files a decided request's inputs under
    INPUTS_NAMESPACE / INPUTS_KEY, as received, as one string of fields joined by a line feed
    (which no header, path or bare SAN holds, and, unlike NUL, Envoy's Lua API keeps in a
    string; sidecar.transports.envoy_inputs reads it): INPUTS_FORMAT,
    `:method`, `:path`, the local address, the peer (`` none, `u` an mTLS peer whose SANs
    are not all bare: unnamed, as identity() reads it, `m`), its URI SANs and DNS SANs (each
    joined by `,`), then name and value of each header of `names` the request has. One
    string: cheaper for Envoy to write and the sidecar to read than a Struct. A value that is
    not UTF-8 files the empty string instead: the sidecar then logs nothing of the request."""
    if not names:
        return "local CAPTURE = nil"
    return "\n".join(
        [
            "local CAPTURE = (function()",
            f"  local NAMES = {_lua(sorted(set(names)))}",
            f"  local NS, KEY = {lua_string(INPUTS_NAMESPACE)}, {lua_string(INPUTS_KEY)}",
            "  local concat = table.concat",
            "  local function all_bare(list)",
            "    for _, s in ipairs(list) do if not bare(s) then return false end end",
            "    return true",
            "  end",
            "  return function(si, h)",
            "    local address = si:downstreamLocalAddress() or ''",
            "    local method, path = h:get(':method') or 'GET', h:get(':path') or '/'",
            f"    local out = {{{lua_string(INPUTS_FORMAT)}, method, path, address, '', '', ''}}",
            "    local ssl = si:downstreamSslConnection()",
            "    if ssl ~= nil and ssl:peerCertificatePresented() then",
            "      local uris, dnss = ssl:uriSanPeerCertificate(), ssl:dnsSansPeerCertificate()",
            "      if all_bare(uris) and all_bare(dnss) then",
            "        out[5], out[6], out[7] = 'm', concat(uris, ','), concat(dnss, ',')",
            "      else out[5] = 'u' end",
            "    end",
            "    local n = 7",
            "    for i = 1, #NAMES do",
            "      local v = h:get(NAMES[i])",
            "      if v ~= nil then",
            "        if not utf8(v) then si:dynamicMetadata():set(NS, KEY, ''); return end",
            "        out[n + 1], out[n + 2] = NAMES[i], v",
            "        n = n + 2",
            "      end",
            "    end",
            "    si:dynamicMetadata():set(NS, KEY, concat(out, '\\n'))",
            "  end",
            "end)()",
        ]
    )


def metadata_text(text: str) -> str:
    """A field as the fast path's answer header carries it (control characters escaped)."""
    return _METADATA_CONTROL.sub(lambda m: f"%{ord(m.group()):02X}", text)


STEERING = r"""
local function listener_port(si)
  local address = si:downstreamLocalAddress() or ""
  return tonumber(address:match(":(%d+)$"))
end
local LANE_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_%.%-]*$"
-- A steering event (sidecar.ops.request_metrics.steering_events) added to those met so far.
local function event(ev, name) return ev and (ev .. "," .. name) or name end
local function identity_events(id)
  if id == MTLS_UNNAMED then return "malformed_xfcc" end  -- as the fast path counts it
  local ev = nil
  if id.bad_spiffe then ev = "malformed_spiffe_id" end
  if id.bad_dns then ev = event(ev, "malformed_dns_san") end
  return ev
end
-- A version as `sidecar.core.versions.is_version` surely reads one (MAJOR.MINOR.PATCH, a
-- leading `v`, no leading zero); other values are left to the sidecar.
local function plain_version(v)
  return find(v, "^v?%d+%.%d+%.%d+$") ~= nil and not find(v, "^v?0%d") and not find(v, "%.0%d")
end
local function steer(si, h)
  local id = identity(si)
  if T.xfcc and not id.mtls and h:get("x-forwarded-client-cert") ~= nil then und() end
  for _, name in ipairs(T.bail) do if h:get(name) ~= nil then und() end end
  local trusted
  if T.any_port and T.ports[listener_port(si)] then trusted = true
  elseif not id.mtls then trusted = T.plaintext
  else trusted = T.trusts(id) end
  local removed, remove = {}, {}
  local r = {h = h, c = {}, removed = removed, id = id}  -- r.method: read by method(r) if a rule asks
  local baggage = T.baggage_key and hd(r, "baggage")  -- nil or false: none to read
  if baggage and find(baggage, CONTROL) then und() end
  local ev = id.mtls and identity_events(id) or nil  -- the steering events met (rare), joined by ","
  if baggage and not baggage_well_formed(baggage) then ev = event(ev, "malformed_baggage") end
  if not trusted then
    for _, name in ipairs(T.protected) do
      if h:get(name) ~= nil then removed[name] = true; remove[#remove + 1] = name end
    end
    if baggage then  -- strip_untrusted: the lane member goes, every other stays
      local stripped = table.concat(others(baggage, T.baggage_key), ",")
      if stripped ~= baggage then
        baggage = stripped
        r.c["baggage"] = stripped ~= "" and stripped or false
        if stripped == "" then removed["baggage"] = true; remove[#remove + 1] = "baggage" end
      end
    end
  end
  for _, name in ipairs(T.versions) do
    local v = hd(r, name)
    if v ~= nil and not plain_version(v) then und() end
  end
  local raw = h:get(":path") or "/"
  if find(raw, "[^\33-\126]") then und() end
  local q = find(raw, "?", 1, true)
  if q then r.path, r.query = sub(raw, 1, q - 1), sub(raw, q + 1) else r.path, r.query = raw, "" end
  local d = denied(r)
  local lane = nil
  if T.color and trusted then
    lane = hd(r, T.color)
    if (lane == nil or lane == "") and baggage then lane = member_value(baggage, T.baggage_key) end
    if lane ~= nil and lane ~= "" and (#lane > 64 or not find(lane, LANE_PATTERN)) then
      ev = event(ev, "malformed_lane")
      lane = nil
    elseif lane == "" then lane = nil end
  end
  if d == nil and lane ~= nil then
    local cluster = T.lanes[lane]
    d = {cluster = cluster or T.color_fallback, reason = "lane"}
    d.rule = cluster and ("lane:" .. lane) or "lane:unknown"
  end
  if d == nil then d = decide(r) end
  if d.deny_status then lane = nil end
  return d, lane, remove, id, baggage or "", ev
end
local KEYS = T.keys  -- each field's metadata key, written once
-- The baggage header of a request that sent none: with_member("", key, lane), a pure
-- function of the lane, remembered for the first MEMBERS_KEPT lanes (a trusted caller
-- names its own).
local MEMBERS, MEMBERS_KEPT, members_kept = {}, 256, 0
local function lane_member(lane)
  local member = MEMBERS[lane]
  if member == nil then
    member = with_member("", T.baggage_key, lane)
    if members_kept < MEMBERS_KEPT then MEMBERS[lane], members_kept = member, members_kept + 1 end
  end
  return member
end
local function meta(md, d, lane, principal)
  local ns = T.ns
  md:set(ns, KEYS.cluster, d.cluster)
  md:set(ns, KEYS.rule, d.rule)
  md:set(ns, KEYS.reason, d.reason)
  if d.bucket then md:set(ns, KEYS.bucket, string.format("%d", d.bucket)) end
  if d.key_source then md:set(ns, KEYS.key_source, d.key_source) end
  md:set(ns, KEYS.version, T.version)
  if lane then md:set(ns, KEYS.lane, lane) end
  if d.mirror then md:set(ns, KEYS.mirror, d.mirror) end
  if principal ~= "" then md:set(ns, KEYS.identity, principal) end
  if d.deny_status then
    md:set(ns, KEYS.deny_status, string.format("%d", d.deny_status))
    md:set(ns, KEYS.deny_reason, d.meta_reason or d.deny_reason)
  end
end
-- untrusted_headers_removed when a header removed is not set again (the core's removals less
-- the headers it sets), once the request's headers are set.
local function removed_events(h, remove, ev)
  for _, name in ipairs(remove) do
    if h:get(name) == nil then
      if ev and find(ev, "untrusted_headers_removed", 1, true) then return ev end
      return event(ev, "untrusted_headers_removed")
    end
  end
  return ev
end
local EVENTS_NS, EVENTS_KEY = T.events_ns, T.events_key
local function apply(handle, si, h, d, lane, remove, id, baggage, ev)
  local md = si:dynamicMetadata()
  if d.deny_status then
    meta(md, d, nil, id.principal)
    if #remove > 0 then ev = event(ev, "untrusted_headers_removed") end
    if ev then md:set(EVENTS_NS, EVENTS_KEY, ev) end
    local status = d.deny_status
    if status >= 500 then status = 403 end
    local answer = {[":status"] = string.format("%d", status), ["content-type"] = "text/plain; charset=utf-8"}
    handle:respond(answer, d.deny_reason)
    return
  end
  for _, name in ipairs(remove) do h:remove(name) end
  h:replace(T.routing, d.cluster)
  if d.mirror then h:replace(T.mirror_header, d.mirror)
  elseif h:get(T.mirror_header) ~= nil then  -- as the early strip
    h:remove(T.mirror_header)
    ev = event(ev, "untrusted_headers_removed")  -- as the core counts it
  end
  if T.color then
    lane = lane or T.lane_of[d.cluster] or d.cluster
    h:replace(T.color, lane)
    if T.baggage_key then  -- with_member: ours replaced, every other member kept
      local b, dropped
      if baggage == "" then b = lane_member(lane); dropped = b == ""
      else b, dropped = with_member(baggage, T.baggage_key, lane) end
      if b ~= "" then h:replace("baggage", b) end
      if dropped then ev = event(ev, "baggage_over_limit") end
    end
  end
  meta(md, d, lane, id.principal)
  if d.issued then issue(h, md, d, T.ns, KEYS) end  -- lua_cookies: a new visitor's key
  if #remove > 0 then ev = removed_events(h, remove, ev) end
  if ev then md:set(EVENTS_NS, EVENTS_KEY, ev) end  -- only then: the common request writes nothing more
  handle:clearRouteCache()
end
function envoy_on_request(handle)
  local si, h = handle:streamInfo(), handle:headers()
  local ok, d, lane, remove, id, baggage, ev = pcall(steer, si, h)
  if ok and CAPTURE then pcall(CAPTURE, si, h) end  -- as received: before apply changes them
  if ok then return apply(handle, si, h, d, lane, remove, id, baggage, ev) end
  local md = si:dynamicMetadata()
  md:set(T.mark_ns, T.mark_key, true)
  if d ~= U then
    md:set(T.mark_ns, T.error_key, true)
    handle:logErr("graysteer: deciding failed, left to the sidecar: " .. tostring(d))
  end
end
"""
