"""The fixed part of the Lua that decides inside Envoy (sidecar.core.lua_table writes the rest).

Plain Lua 5.1 for Envoy's LuaJIT: MurmurHash3_x86_32 in `bit` operations (bucketing exactly
as sidecar.core.bucketing), the request as the core's `Request` reads it (headers, the
cookie and query parsers, the path), the peer certificate's identity as `Identity.from_sans`
builds it, host, identity and DNS matchers as the core's, and the steering of
sidecar.core.steering. Every helper that meets input it cannot read exactly as the core does
raises UNDECIDED (`error(U, 0)`): the request is then marked for the sidecar's fast path and
nothing of it has been changed.

Lua strings are bytes; the core's are text. Every value read is checked to be UTF-8 (the
fast path reads other bytes as `!`), and every test here is written so that on valid UTF-8
the byte test and the core's text test agree (prefixes, lengths in ASCII-only cases).
"""

# The names the generated part uses: U, und, hd, method, cookie, query, hostm, globm, dnsm, split,
# mirror_route, TWO32. See sidecar.core.lua_table for the entry point around them.
RUNTIME = r"""
local bit = require("bit")
local band, bor, bxor, lshift, rshift, tobit = bit.band, bit.bor, bit.bxor, bit.lshift, bit.rshift, bit.tobit
local rol = bit.rol
local byte, sub, find, lower = string.byte, string.sub, string.find, string.lower
local upper, gsub, char = string.upper, string.gsub, string.char
local floor, random = math.floor, math.random
local U = {}
local function und() error(U, 0) end

-- ---- MurmurHash3_x86_32, seed 0, over bytes --------------------------------------------------
local function mul32(a, b)
  local alo, ahi = band(a, 0xffff), band(rshift(a, 16), 0xffff)
  local blo = band(b, 0xffff)
  return tobit(alo * b + lshift(tobit(ahi * blo), 16))
end
local C1, C2, C3 = tobit(0xcc9e2d51), tobit(0x1b873593), tobit(0xe6546b64)
local F1, F2 = tobit(0x85ebca6b), tobit(0xc2b2ae35)
local function murmur3(s)
  local h, n = 0, #s
  local blocks = n - n % 4
  for i = 1, blocks, 4 do
    local b1, b2, b3, b4 = byte(s, i, i + 3)
    local k = bor(b1, lshift(b2, 8), lshift(b3, 16), lshift(b4, 24))
    k = mul32(rol(mul32(k, C1), 15), C2)
    h = rol(bxor(h, k), 13)
    h = tobit(h * 5 + C3)  -- exact: |h * 5 + C3| < 2^35, and tobit takes it modulo 2^32
  end
  local rem, k = n % 4, 0
  if rem == 3 then k = bxor(k, lshift(byte(s, blocks + 3), 16)) end
  if rem >= 2 then k = bxor(k, lshift(byte(s, blocks + 2), 8)) end
  if rem >= 1 then
    k = bxor(k, byte(s, blocks + 1))
    h = bxor(h, mul32(rol(mul32(k, C1), 15), C2))
  end
  h = bxor(h, n)
  h = bxor(h, rshift(h, 16))
  h = mul32(h, F1)
  h = bxor(h, rshift(h, 13))
  h = mul32(h, F2)
  return bxor(h, rshift(h, 16))
end
local TWO32 = 4294967296
-- (unsigned hash * total) >> 32, exact for totals below 2^36: in 16-bit halves
local function bucket(seed, key, total)
  local u = murmur3(seed .. key) % TWO32
  local uh, ul = floor(u / 65536), u % 65536
  return floor((uh * total + floor(ul * total / 65536)) / 65536)
end
local function entry(bounds, b)
  for i = 1, #bounds do if bounds[i] > b then return i end end
  return #bounds
end

-- ---- text ------------------------------------------------------------------------------------
-- Whether `s` is UTF-8 as Python decodes it strictly (no overlongs, surrogates, > U+10FFFF).
local function utf8(s)
  if not find(s, "[\128-\255]") then return true end
  local i, n = 1, #s
  while i <= n do
    local c = byte(s, i)
    if c < 0x80 then i = i + 1
    else
      local len, lo, hi = 0, 0x80, 0xBF
      if c >= 0xC2 and c <= 0xDF then len = 2
      elseif c >= 0xE0 and c <= 0xEF then
        len = 3
        if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
      elseif c >= 0xF0 and c <= 0xF4 then
        len = 4
        if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
      else return false end
      if i + len - 1 > n then return false end
      local c2 = byte(s, i + 1)
      if c2 < lo or c2 > hi then return false end
      for j = i + 2, i + len - 1 do
        local cj = byte(s, j)
        if cj < 0x80 or cj > 0xBF then return false end
      end
      i = i + len
    end
  end
  return true
end
local function text(s) if not utf8(s) then und() end return s end
-- Python's str.strip(): ASCII whitespace (with \x1c-\x1f) here; a Unicode space left at
-- either end (U+0085, U+00A0, U+1680, U+2000-200A, U+2028/9, U+202F, U+205F, U+3000) is
-- not read here at all.
local function unicode_space_edge(s)
  local first, last = byte(s, 1), byte(s, #s)
  return (first ~= nil and first >= 0xC2) or (last ~= nil and last >= 0x80)
end
local UNICODE_SPACES = {
  ["\194\133"] = true, ["\194\160"] = true, ["\225\154\128"] = true, ["\226\128\168"] = true,
  ["\226\128\169"] = true, ["\226\128\175"] = true, ["\226\129\159"] = true, ["\227\128\128"] = true,
}
local function pystrip(s)
  s = s:match("^[\t-\r\28-\31 ]*(.-)[\t-\r\28-\31 ]*$")
  if unicode_space_edge(s) then
    local probe = s:match("^[\194\225\226\227][\128-\191]+") or ""
    local tail = s:match("[\194\225\226\227][\128-\191]+$") or ""
    for _, piece in ipairs({probe, tail}) do
      local en_space = #piece == 3 and sub(piece, 1, 2) == "\226\128" and byte(piece, 3) <= 0x8A
      if UNICODE_SPACES[piece] or en_space then und() end
    end
  end
  return s
end

-- ---- W3C baggage (sidecar.core.baggage) -------------------------------------------------------
-- A header with a control character is not read here (the core drops such members).
local CONTROL = "[%z\1-\8\10-\31\127]"
local function members(header)
  local out = {}
  for m in (header .. ","):gmatch("([^,]*),") do
    m = pystrip(m)
    if m ~= "" then out[#out + 1] = m end
  end
  return out
end
local function member_key(m)
  local eq = find(m, "=", 1, true)
  return pystrip(eq and sub(m, 1, eq - 1) or m)
end
local function member_value(header, key)
  for _, m in ipairs(members(header)) do
    if member_key(m) == key then
      local eq = find(m, "=", 1, true)
      local value = eq and sub(m, eq + 1) or ""
      local semi = find(value, ";", 1, true)
      if semi then value = sub(value, 1, semi - 1) end
      value = pystrip(value)
      if value == "" then return nil end
      return value
    end
  end
  return nil
end
-- baggage.well_formed, once CONTROL is ruled out: every member `key=value`, its key not blank
local function baggage_well_formed(header)
  for _, m in ipairs(members(header)) do
    local eq = find(m, "=", 1, true)
    if not eq or pystrip(sub(m, 1, eq - 1)) == "" then return false end
  end
  return true
end
local function others(header, key)
  local kept = {}
  for _, m in ipairs(members(header)) do if member_key(m) ~= key then kept[#kept + 1] = m end end
  return kept
end
local function with_member(header, key, value)
  local kept = others(header, key)
  kept[#kept + 1] = key .. "=" .. value
  local candidate = table.concat(kept, ",")
  if #kept > 64 or #candidate > 8192 then
    kept[#kept] = nil
    return table.concat(kept, ","), true  -- dropped: baggage_over_limit
  end
  return candidate
end

-- ---- the request -----------------------------------------------------------------------------
-- r: {h = headers, c = cache, removed = set, path, query, method (once read)}
-- the cookie header as the sidecar reads it (cookies.canonical_cookie_header): its pairs, split at
-- `;` and `,` (ext_authz joins an HTTP/1.1 client's repeated headers with `,`), joined with "; "
local function cookie_header(h)
  local parts = {}
  for i = 0, h:getNumValues("cookie") - 1 do
    for piece in (text(h:getAtIndex("cookie", i)) .. ";"):gmatch("([^;,]*)[;,]") do
      piece = pystrip(piece)
      if piece ~= "" then parts[#parts + 1] = piece end
    end
  end
  return table.concat(parts, "; ")
end
local function hd(r, name)
  local v = r.c[name]
  if v == nil then
    if r.removed[name] then v = false
    else
      v = r.h:get(name)
      if v == nil then v = false elseif name == "cookie" then v = cookie_header(r.h) else text(v) end
    end
    r.c[name] = v
  end
  return v or nil
end
local function startswith(s, p) return s ~= nil and sub(s, 1, #p) == p end
local function method(r)  -- read once, when a rule's method condition is reached
  local m = r.method
  if m == nil then
    m = upper(r.h:get(":method") or "GET")
    r.method = m
  end
  return m
end

local function cookies(r)
  local parsed = r.cookies
  if parsed then return parsed end
  parsed = {}
  r.cookies = parsed
  local header = hd(r, "cookie")  -- its pairs joined with "; " (cookie_header)
  if header == nil then return parsed end
  for pair in (header .. ";"):gmatch("([^;]*);") do
    local eq = find(pair, "=", 1, true)
    if eq then
      local name = pystrip(sub(pair, 1, eq - 1))
      if name ~= "" and parsed[name] == nil then
        local value = pystrip(sub(pair, eq + 1))
        if #value >= 2 and sub(value, 1, 1) == '"' and sub(value, -1) == '"' then
          value = sub(value, 2, -2)
        end
        parsed[name] = value
      end
    end
  end
  return parsed
end
local function cookie(r, name) return cookies(r)[name] end

local function unquote(s)
  s = gsub(s, "+", " ")
  if not find(s, "%", 1, true) then return s end
  return text((gsub(s, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end)))
end
local function query(r, name)
  local params = r.params
  if not params then
    params = {}
    r.params = params
    for pair in (r.query .. "&"):gmatch("([^&]*)&") do
      if pair ~= "" then
        local eq = find(pair, "=", 1, true)
        local k, v = pair, ""
        if eq then k, v = sub(pair, 1, eq - 1), sub(pair, eq + 1) end
        k, v = unquote(k), unquote(v)
        if params[k] == nil then params[k] = v end
      end
    end
  end
  return params[name]
end

-- ---- hosts (sidecar.core.hosts) ---------------------------------------------------------------
local function split_port(a)
  if sub(a, 1, 1) == "[" then
    local e = find(a, "]", 1, true)
    if e and sub(a, e + 1, e + 1) == ":" then return sub(a, 1, e), sub(a, e + 2) end
    return a, nil
  end
  local first = find(a, ":", 1, true)
  if first and not find(a, ":", first + 1, true) then return sub(a, 1, first - 1), sub(a, first + 1) end
  return a, nil
end
-- spec: {any=bool, exact=set, with_port=set, suffixes={{suffix, names_port}}, prefixes={...}}
local function hostm(spec, authority)
  if authority == nil or authority == "" then return false end
  if spec.unread then und() end
  if spec.any then return true end
  if find(authority, "[\128-\255]") then und() end
  authority = lower(authority)
  local host = split_port(authority)
  if spec.exact[host] or spec.with_port[authority] then return true end
  for _, s in ipairs(spec.suffixes) do
    local subject = s[2] and authority or host
    if #subject > #s[1] and sub(subject, -#s[1]) == s[1] then return true end
  end
  for _, p in ipairs(spec.prefixes) do
    if #host > #p and sub(host, 1, #p) == p then return true end
  end
  return false
end

-- ---- identity (sidecar.core.identity) ---------------------------------------------------------
local NO_ID = {mtls = false, dns = {}, principal = ""}
local function spiffe_parts(uri)
  if sub(uri, 1, 9) ~= "spiffe://" or #uri > 2048 then return nil end
  local rest = sub(uri, 10)
  local slash = find(rest, "/", 1, true)
  if not slash then return nil end
  local domain, path = sub(rest, 1, slash - 1), sub(rest, slash + 1)
  if #domain > 255 or not find(domain, "^[a-z0-9%._%-]+$") then return nil end
  for seg in (path .. "/"):gmatch("([^/]*)/") do
    if seg == "." or seg == ".." or not find(seg, "^[A-Za-z0-9%._%-]+$") then return nil end
  end
  return domain
end
local function is_dns_name(name)
  if #name > 253 then return false end
  local s = name
  if sub(s, 1, 2) == "*." then s = sub(s, 3) end
  for label in (s .. "."):gmatch("([^.]*)%.") do
    if #label < 1 or #label > 63 or not find(label, "^[A-Za-z0-9_%-]+$") then return false end
  end
  return true
end
-- The fast path reads SANs from x-forwarded-client-cert, where Envoy writes them unquoted:
-- a certificate with a SAN holding anything but printable ASCII other than `"` `,` `;` `=`
-- is, there, an mTLS connection without a name (http_check.MTLS_UNNAMED). So here too.
local MTLS_UNNAMED = {mtls = true, dns = {}, principal = ""}
local function bare(s) return not find(s, '[^\33-\126]') and not find(s, '[",;=]') end
local function identity(si)
  local ssl = si:downstreamSslConnection()
  if ssl == nil or not ssl:peerCertificatePresented() then return NO_ID end
  local uris, dnss = ssl:uriSanPeerCertificate(), ssl:dnsSansPeerCertificate()
  local id = {mtls = true, dns = {}, principal = ""}
  for _, u in ipairs(uris) do if not bare(u) then return MTLS_UNNAMED end end
  for _, d in ipairs(dnss) do
    if not bare(d) then return MTLS_UNNAMED end
    if is_dns_name(d) then id.dns[#id.dns + 1] = d else id.bad_dns = true end  -- malformed_dns
  end
  if #uris == 1 then
    local domain = spiffe_parts(uris[1])
    if domain then id.spiffe, id.td = uris[1], domain end
  end
  if id.spiffe == nil then  -- Identity.malformed: URI SANs that look like SPIFFE IDs
    for _, u in ipairs(uris) do if lower(sub(u, 1, 7)) == "spiffe:" then id.bad_spiffe = true end end
  end
  id.principal = id.spiffe or id.dns[1] or ""
  return id
end
-- a SPIFFE glob: `*` any characters; parts = the glob split at `*`
local function globm(parts, s)
  if s == nil then return false end
  local first, last = parts[1], parts[#parts]
  if #parts == 1 then return s == first end
  local start, stop = #first, #s - #last
  if stop < start or sub(s, 1, #first) ~= first or sub(s, stop + 1) ~= last then return false end
  for i = 2, #parts - 1 do
    local piece = parts[i]
    local at = find(s, piece, start + 1, true)
    if at == nil or at + #piece - 1 > stop then return false end
    start = at + #piece - 1
  end
  return true
end
-- a DNS SAN pattern, ASCII case-insensitive; `*.x` one left-most label
local function dnsm(pattern, id)
  for _, name in ipairs(id.dns) do
    name = lower(name)
    if sub(pattern, 1, 2) ~= "*." then
      if name == pattern then return true end
    else
      local suffix = sub(pattern, 2)
      local label = sub(name, 1, #name - #suffix)
      if #name > #suffix and sub(name, -#suffix) == suffix and not find(label, "[%.%*]") then return true end
    end
  end
  return false
end

-- ---- splits and mirrors (sidecar.core.table) --------------------------------------------------
-- s: {rule, seed, total, bounds, clusters, keys = {{kind, name, label}}, missing, mirror}
local function split_key(r, k)
  local kind = k[1]
  if kind == 1 then return hd(r, k[2]) end
  if kind == 2 then return cookie(r, k[2]) end
  if kind == 3 then return query(r, k[2]) end
  return r.id.principal
end
local function mirrored(d, m, key)
  if m == nil or d.cluster == m.cluster then return d end
  local picked
  if key ~= nil then picked = bucket(m.seed, key, 10000) < m.share else picked = random(0, 9999) < m.share end
  if picked then d.mirror = m.cluster end
  return d
end
-- the decision of split `s` for `key`, read from `source` (a key source, or how it was issued)
local function bucketed(s, key, source)
  local b = bucket(s.seed, key, s.total)
  local d = {cluster = s.clusters[entry(s.bounds, b)], rule = s.rule, reason = "split", bucket = b}
  d.key_source = source
  return d
end
local function split(r, s)
  for _, k in ipairs(s.keys) do
    local key = split_key(r, k)
    if key ~= nil and key ~= "" then return mirrored(bucketed(s, key, k[3]), s.mirror, key) end
  end
  local d
  if s.missing ~= nil then
    d = {cluster = s.missing, rule = s.rule, reason = "split", key_source = "missing"}
  else
    local b = random(0, s.total - 1)
    d = {cluster = s.clusters[entry(s.bounds, b)], rule = s.rule, reason = "split", bucket = b}
    d.key_source = "random"
  end
  return mirrored(d, s.mirror, nil)
end
local function mirror_route(d, m)
  local copy = {}
  for k, v in pairs(d) do copy[k] = v end
  return mirrored(copy, m, nil)
end
"""
