-- wrk script for the embedding gateway benchmark (bench/run.py drives it).
--
--   wrk -t1 -c32 -d10s -s bench/wrk/embed.lua http://127.0.0.1:8765 -- BODIES [PATH] [API_KEY]
--
-- BODIES: a file with one JSON request body per line; each connection takes the next body in turn, so
-- the server sees the whole corpus rather than one cached sentence. PATH defaults to /v1/embeddings.
-- done() prints one machine-readable line, `WRKJSON {...}`: request counts, errors, latency percentiles
-- (microseconds) and the responses counted by status (200, 429, anything else).
-- Note: wrk's latency figures leave out the time a connection waited in delay().

local reqs = {}
local n, i = 0, 0
local threads = {}

-- Per-thread counters; globals so that done() can read them through thread:get().
s200, s429, sother = 0, 0, 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local bodies = args[1] or error("usage: ... -- BODIES [PATH] [API_KEY]")
  local path = args[2] or "/v1/embeddings"
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if args[3] and #args[3] > 0 then
    wrk.headers["Authorization"] = "Bearer " .. args[3]
  end
  for line in io.lines(bodies) do
    if #line > 0 then
      n = n + 1
      reqs[n] = wrk.format("POST", path, nil, line)
    end
  end
  if n == 0 then error("no request bodies in " .. bodies) end
end

function request()
  i = i % n + 1
  return reqs[i]
end

-- POLITE=1 in the environment: after each 429 a connection waits Retry-After before it sends again (wrk asks
-- delay() before each request; the wait goes to the next connection to send, most often the one refused).
local polite = os.getenv("POLITE") == "1"
local pause_ms = 0

function response(status, headers, body)
  if status == 200 then
    s200 = s200 + 1
  elseif status == 429 then
    s429 = s429 + 1
    if polite then
      pause_ms = 1000 * (tonumber(headers["Retry-After"] or headers["retry-after"] or "1") or 1)
    end
  else
    sother = sother + 1
  end
end

function delay()
  local ms = pause_ms
  pause_ms = 0
  return ms
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
