-- wrk script: a paced keep-alive load. Each connection waits DELAY milliseconds after every response before it sends
-- its next request (`wrk ... -s paced.lua URL -- DELAY`, 1 ms by default), so a run offers about
-- connections x 1000 / (DELAY + the response time) requests a second, whatever answers: the latencies of two paths
-- are compared at about the same load, not each at its own saturation.
local delay_ms = 1

function init(args)
  if args[1] ~= nil then
    delay_ms = tonumber(args[1])
  end
end

function delay()
  return delay_ms
end
