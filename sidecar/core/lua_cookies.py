"""New visitor keys in Envoy's Lua (envoy_decides): the pieces sidecar.core.lua_table adds to
a table that issues them (`when_key_missing: {assign: ...}`, sidecar.core.cookies).

The random key is Envoy's own `x-request-id`: the connection manager makes it a UUIDv4 for
each request (122 random bits), and the key is its 32 hex digits. A request whose
`x-request-id` is no UUIDv4 (Envoy configured not to generate one, or a client's kept) is
left to the sidecar's fast path, which draws the key there. The request carries the key to
the backend in its `cookie` header; the response handler adds the `set-cookie` the request
filed in dynamic metadata.

Kept apart from the table's hot path: a table without such a split gets none of it.
"""

from sidecar.core.cookies import MAX_KEY_CHARS, MIN_KEY_CHARS, CookieSpec
from sidecar.core.table import Table

SET_COOKIE_FIELD = "set_cookie"  # the field (`T.keys`) of the metadata key of the Set-Cookie


def assign_spec(spec: CookieSpec) -> dict[str, object]:
    """A split's `assign` as the Lua's constant."""
    return {
        "name": spec.name,
        "source": spec.source,
        "attributes": spec.set_cookie("")[len(spec.name) + 1 :],  # "; Max-Age=...; ..."
    }


def runtime(table: Table) -> str:
    """The functions a table that issues keys needs (after the runtime, before the rules);
    empty for any other."""
    if not table.assigns:
        return ""
    return ASSIGN.replace("MIN_KEY", str(MIN_KEY_CHARS)).replace("MAX_KEY", str(MAX_KEY_CHARS))


def response_handler(table: Table) -> str:
    """`envoy_on_response` adding the Set-Cookie a request filed; empty without assigns."""
    return RESPONSE if table.assigns else ""


ASSIGN = r"""
-- ---- new visitor keys (sidecar.core.cookies, sidecar.core.lua_cookies) --------------------
local function well_formed(v)
  if v == nil or #v < MIN_KEY or #v > MAX_KEY or find(v, "[^A-Za-z0-9_%-]") then return nil end
  return v
end
local UUID4 = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89abAB]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"
local function drawn_key(r)
  local id = r.h:get("x-request-id")
  if id == nil or not find(id, UUID4) then und() end  -- the sidecar draws one
  return lower((gsub(id, "-", "")))
end
local function assigned_split(r, s)
  local a = s.assign
  for _, k in ipairs(s.keys) do
    local key
    if k[1] == 2 and k[2] == a.name then key = well_formed(cookie(r, k[2])) else key = split_key(r, k) end
    if key ~= nil and key ~= "" then return mirrored(bucketed(s, key, k[3]), s.mirror, key) end
  end
  local key = drawn_key(r)
  local d = bucketed(s, key, a.source)
  d.issued = {name = a.name, key = key, set_cookie = a.name .. "=" .. key .. a.attributes,
              header = hd(r, "cookie") or ""}
  return mirrored(d, s.mirror, nil)
end
-- the request's cookie header with the issued key in place of any value it had (cookies.with_cookie):
-- every pair of its name dropped from the header as read (cookie_header: pairs joined with "; ")
local function issue(h, md, d, ns, keys)
  local i, parts = d.issued, {}
  for pair in (i.header .. "; "):gmatch("([^;]*); ") do
    if pair ~= "" and pystrip(pair:match("^([^=]*)")) ~= i.name then parts[#parts + 1] = pair end
  end
  parts[#parts + 1] = i.name .. "=" .. i.key
  h:replace("cookie", table.concat(parts, "; "))
  md:set(ns, keys.issued_cookie, i.name)
  md:set(ns, keys.set_cookie, i.set_cookie)
end
"""

RESPONSE = r"""
function envoy_on_response(handle)
  local filed = handle:streamInfo():dynamicMetadata():get(T.ns)
  local value = filed and filed[T.keys.set_cookie]
  if value then handle:headers():add("set-cookie", value) end
end
"""
