"""What Envoy enforces by itself when the sidecar did not decide a request.

Routing fails open: with the sidecar away (not yet healthy, restarting, slower than
`message_timeout`, failing), Envoy sends the request on to the default route. Security
must not fail open with it, so the generated front proxy carries a backstop that applies
exactly on that route, the one a request takes when no decision set the routing header:

- deny rules, compiled from the same table into Envoy's RBAC filter (a DENY policy per
  rule, matching headers, path, method and the peer certificate natively), answer 403;
- the protected headers (override headers and the color header, which only a trusted
  caller may carry) are removed, and a Lua filter drops the lane member from `baggage`,
  keeping every other member.

On the route a decision selected (the guarded `cluster_header` route) both are switched
off per route: the sidecar has already applied the deny rules with their own status and
stripped what the caller may not carry.
"""

import re
from typing import Any

from envoy_data_plane.envoy.config.core.v3 import DataSource
from envoy_data_plane.envoy.config.rbac.v3 import (
    Permission,
    PermissionSet,
    Policy,
    Principal,
    PrincipalAuthenticated,
    RbacAction,
)
from envoy_data_plane.envoy.config.rbac.v3 import Rbac as RbacRules
from envoy_data_plane.envoy.config.route.v3 import HeaderMatcher
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua, LuaPerRoute
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac, RbacPerRoute
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
from envoy_data_plane.envoy.type.matcher.v3 import PathMatcher, RegexMatcher, StringMatcher
from envoy_data_plane.google.protobuf import Any as AnyMessage

from sidecar.core import Table
from sidecar.core.regex import regex_problem

RBAC_FILTER = "envoy.filters.http.rbac"
LUA_FILTER = "envoy.filters.http.lua"
RBAC_STAT_PREFIX = "graysteer_backstop."  # http.<hcm>.rbac.graysteer_backstop.denied
LUA_MARKER = "-- graysteer: drop the lane member from baggage"


def protected_headers(table: Table) -> list[str]:
    """The headers a request must lose when no decision vouched for its caller."""
    return sorted(table.trust.protected)


def baggage_key(table: Table) -> str | None:
    return table.coloring.baggage if table.coloring is not None else None


def _regex(pattern: str) -> StringMatcher:
    return StringMatcher(safe_regex=RegexMatcher(regex=pattern))


def _string_matcher(form: str | dict[str, Any]) -> StringMatcher:
    if isinstance(form, str):
        return StringMatcher(exact=form)
    if "exact" in form:
        return StringMatcher(exact=form["exact"])
    if "prefix" in form:
        return StringMatcher(prefix=form["prefix"])
    return _regex(form["regex"])


def _header_permission(name: str, form: str | dict[str, Any]) -> Permission:
    name = name.lower()
    if isinstance(form, dict) and form.get("present"):
        return Permission(header=HeaderMatcher(name=name, present_match=True))
    if isinstance(form, dict) and form.get("absent"):
        return Permission(header=HeaderMatcher(name=name, present_match=True, invert_match=True))
    return Permission(header=HeaderMatcher(name=name, string_match=_string_matcher(form)))


def _envoy_regex(pattern: str, what: str) -> StringMatcher:
    """`pattern` as a safe_regex matcher, or ValueError when Envoy would refuse it (RE2's
    program size limit): the config must never fail to load in Envoy."""
    problem = regex_problem(pattern)
    if problem:
        raise ValueError(f"{what} cannot be enforced by Envoy's RBAC backstop: {problem}")
    return _regex(pattern)


def _glob_matcher(glob: str) -> StringMatcher:
    """A SPIFFE glob (`*` any run of characters, as the sidecar matches it): exact without a
    wildcard, a prefix with one trailing `*` (no regex, so no size limit), else an anchored
    RE2 pattern."""
    stars = glob.count("*")
    if stars == 0:
        return StringMatcher(exact=glob)
    if stars == 1 and glob.endswith("*"):
        return StringMatcher(prefix=glob[:-1])
    pattern = "".join(".*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", glob))
    return _envoy_regex(pattern, f"identity glob {glob!r}")


def _dns_regex(pattern: str) -> str:
    """A DNS SAN pattern: `*.example.org` matches exactly one left-most label."""
    if pattern.startswith("*."):
        return r"[^.*]+" + re.escape(pattern[1:].lower())
    return re.escape(pattern.lower())


def _principal(form: dict[str, Any]) -> Principal:
    """The peer certificate test of an identity matcher form (RBAC tests every URI SAN, then
    every DNS SAN, then the subject)."""
    if "exact" in form:
        name = StringMatcher(exact=str(form["exact"]))
    elif "glob" in form:
        name = _glob_matcher(str(form["glob"]))
    elif "trust_domain" in form:
        name = StringMatcher(prefix=f"spiffe://{form['trust_domain']}/")
    elif "regex" in form:
        name = _regex(str(form["regex"]))  # refused at load already when Envoy would refuse it
    elif "dns" in form:
        dns = str(form["dns"])
        name = (
            StringMatcher(exact=dns.lower(), ignore_case=True)
            if not dns.startswith("*.")
            else _envoy_regex(_dns_regex(dns), f"DNS pattern {dns!r}")
        )
        name.ignore_case = True
    else:
        any_peer = Principal(authenticated=PrincipalAuthenticated())
        return any_peer if form.get("present") else Principal(not_id=any_peer)
    return Principal(authenticated=PrincipalAuthenticated(principal_name=name))


def deny_policy(match: dict[str, Any]) -> Policy:
    """One deny rule's `match` as an RBAC policy: every condition must hold."""
    rules = [_header_permission(h, f) for h, f in (match.get("headers") or {}).items()]
    if "path" in match:  # url_path: the path without the query string, as the rules see it
        rules.append(Permission(url_path=PathMatcher(path=_string_matcher(match["path"]))))
    if "method" in match:
        methods = match["method"]
        rules.append(
            Permission(
                or_rules=PermissionSet(
                    rules=[
                        Permission(
                            header=HeaderMatcher(name=":method", string_match=StringMatcher(exact=m.upper()))
                        )
                        for m in ([methods] if isinstance(methods, str) else methods)
                    ]
                )
            )
        )
    permission = Permission(and_rules=PermissionSet(rules=rules)) if rules else Permission(any=True)
    principal = _principal(match["identity"]) if "identity" in match else Principal(any=True)
    return Policy(permissions=[permission], principals=[principal])


def deny_rules(table: Table) -> dict[str, dict[str, Any]]:
    """Deny rule name -> its `match` section, in table order."""
    rules = table.document.get("rules") or []
    assert isinstance(rules, list)
    return {r["name"]: r.get("match") or {} for r in rules if "deny" in r}


def rbac_filter(table: Table) -> HttpFilter | None:
    """Envoy's RBAC filter refusing what the deny rules refuse; None without deny rules."""
    denied = deny_rules(table)
    if not denied:
        return None
    config = Rbac(
        rules=RbacRules(
            action=RbacAction.DENY, policies={name: deny_policy(m) for name, m in denied.items()}
        ),
        rules_stat_prefix=RBAC_STAT_PREFIX,
    )
    return HttpFilter(name=RBAC_FILTER, typed_config=AnyMessage.pack(config))


def strip_baggage_lua(key: str) -> str:
    """Lua that removes the `key` member from `baggage` and keeps every other member."""
    quoted = key.replace("\\", "\\\\").replace('"', '\\"')
    return f"""{LUA_MARKER} "{quoted}"
function envoy_on_request(handle)
  local headers = handle:headers()
  local baggage = headers:get("baggage")
  if baggage == nil then return end
  local kept = {{}}
  for member in string.gmatch(baggage, "[^,]+") do
    local key = string.match(member, "^%s*([^=;%s]+)")
    if key ~= "{quoted}" then
      local trimmed = string.match(member, "^%s*(.-)%s*$")
      if trimmed ~= "" then table.insert(kept, trimmed) end
    end
  end
  if #kept == 0 then headers:remove("baggage") else headers:replace("baggage", table.concat(kept, ",")) end
end
"""


def lua_filter(table: Table) -> HttpFilter | None:
    key = baggage_key(table)
    if key is None:
        return None
    config = Lua(default_source_code=DataSource(inline_string=strip_baggage_lua(key)))
    return HttpFilter(name=LUA_FILTER, typed_config=AnyMessage.pack(config))


def backstop_filters(table: Table) -> list[HttpFilter]:
    """The filters that go after the sidecar's filter and before the router."""
    return [f for f in (lua_filter(table), rbac_filter(table)) if f is not None]


def decided_route_overrides(table: Table) -> dict[str, AnyMessage]:
    """Per-route configs that switch the backstop off on the route a decision selected."""
    overrides: dict[str, AnyMessage] = {}
    if baggage_key(table) is not None:
        overrides[LUA_FILTER] = AnyMessage.pack(LuaPerRoute(disabled=True))
    if deny_rules(table):
        overrides[RBAC_FILTER] = AnyMessage.pack(RbacPerRoute())
    return overrides
