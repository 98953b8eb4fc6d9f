-- wrk script for the cache benchmark's hit-rate-0 runs (bench/cache.py drives it).
--
--   wrk -t1 -c32 -d10s -s bench/wrk/unique.lua http://127.0.0.1:8765 -- BODIES PATH API_KEY TAG
--
-- BODIES: one request body per line, split in two by a TAB where the text of the input ends; each request
-- joins the two halves around " TAG-N" with N counting requests, so no text is ever sent twice (run with
-- one thread: the counter is per thread) and a cache can only miss. done() prints the same `WRKJSON {...}`
-- line as embed.lua.

local heads, tails = {}, {}
local n, i, sent = 0, 0, 0
local path, tag = "/v1/embeddings", "u"
local headers = { ["Content-Type"] = "application/json" }
local threads = {}

s200, s429, sother = 0, 0, 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local bodies = args[1] or error("usage: ... -- BODIES PATH API_KEY TAG")
  path = args[2] or path
  if args[3] and #args[3] > 0 then
    headers["Authorization"] = "Bearer " .. args[3]
  end
  tag = args[4] or tag
  for line in io.lines(bodies) do
    local head, tail = line:match("^(.*)\t(.*)$")
    if head then
      n = n + 1
      heads[n], tails[n] = head, tail
    end
  end
  if n == 0 then error("no request bodies in " .. bodies) end
end

function request()
  i = i % n + 1
  sent = sent + 1
  return wrk.format("POST", path, headers, heads[i] .. " " .. tag .. "-" .. sent .. tails[i])
end

function response(status, headers, body)
  if status == 200 then
    s200 = s200 + 1
  elseif status == 429 then
    s429 = s429 + 1
  else
    sother = sother + 1
  end
end

function done(summary, latency, requests)
  local c200, c429, cother = 0, 0, 0
  for _, t in ipairs(threads) do
    c200 = c200 + (t:get("s200") or 0)
    c429 = c429 + (t:get("s429") or 0)
    cother = cother + (t:get("sother") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "mean_us": %.1f, "s200": %d, "s429": %d, "sother": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    c200, c429, cother))
end
