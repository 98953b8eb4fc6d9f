-- wrk script for the soak test (bench/soak.py drives it).
--
--   wrk -t1 -c64 -d300s -s bench/wrk/soak.lua URL -- BODIES API_KEY
--
-- BODIES: one request per line, "v<TAB>json" for a valid body, "i<TAB>json" for an invalid one. Each
-- request carries X-Request-ID "v-N" or "i-N"; the gateway echoes it, so response() knows which kind
-- each answer belongs to even with many connections per thread. done() prints one `SOAKJSON {...}` line.

local reqs = {}
local n, i = 0, 0
local threads = {}

valid_ok, valid_429, valid_bad, invalid_4xx, invalid_5xx, invalid_2xx, unknown = 0, 0, 0, 0, 0, 0, 0
bad_statuses = ""

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local key = args[2] or ""
  for line in io.lines(args[1]) do
    local kind, body = line:match("^(%a)\t(.*)$")
    if kind then
      n = n + 1
      local headers = { ["Content-Type"] = "application/json", ["X-Request-ID"] = kind .. "-" .. n }
      if #key > 0 then headers["Authorization"] = "Bearer " .. key end
      reqs[n] = wrk.format("POST", "/v1/embeddings", headers, body)
    end
  end
end

function request()
  i = i % n + 1
  return reqs[i]
end

function response(status, headers, body)
  local id = headers["x-request-id"] or headers["X-Request-ID"] or ""
  local kind = id:sub(1, 1)
  if kind == "v" then
    if status == 200 then valid_ok = valid_ok + 1
    elseif status == 429 then valid_429 = valid_429 + 1  -- refused under overload: an answer, not a failure
    else
      valid_bad = valid_bad + 1
      if #bad_statuses < 200 then bad_statuses = bad_statuses .. status .. " " end
    end
  elseif kind == "i" then
    if status >= 500 then invalid_5xx = invalid_5xx + 1
    elseif status >= 400 then invalid_4xx = invalid_4xx + 1
    else invalid_2xx = invalid_2xx + 1 end
  else
    unknown = unknown + 1
  end
end

function done(summary, latency, requests)
  local t = { valid_ok = 0, valid_429 = 0, valid_bad = 0, invalid_4xx = 0, invalid_5xx = 0, invalid_2xx = 0, unknown = 0 }
  local statuses = ""
  for _, th in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + (th:get(k) or 0) end
    statuses = statuses .. (th:get("bad_statuses") or "")
  end
  local e = summary.errors
  io.write(string.format(
    'SOAKJSON {"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"timeouts": %d, "valid_ok": %d, "valid_429": %d, "valid_bad": %d, "invalid_4xx": %d, "invalid_5xx": %d, ' ..
    '"invalid_2xx": %d, ' ..
    '"unknown": %d, "p50_us": %d, "p99_us": %d, "bad_statuses": "%s"}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, t.valid_ok, t.valid_429, t.valid_bad,
    t.invalid_4xx, t.invalid_5xx, t.invalid_2xx, t.unknown, latency:percentile(50), latency:percentile(99),
    statuses))
end
