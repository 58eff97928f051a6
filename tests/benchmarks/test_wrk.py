"""The benchmark harness reads wrk's report correctly (a real wrk 4.x report)."""

from benchmarks.wrk import parse

REPORT = """Running 5s test @ http://127.0.0.1:37115/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    11.36ms    2.05ms  30.10ms   80.12%
    Req/Sec     2.74k   210.33     3.04k    72.00%
  Latency Distribution
     50%   10.90ms
     75%   12.01ms
     90%   13.62ms
     99%   18.47ms
  13633 requests in 5.02s, 4.10MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   2713.19
Transfer/sec:    836.59KB
"""


def test_parse_a_wrk_report() -> None:
    result = parse(REPORT)
    assert (result.requests, result.rps) == (13633, 2713.19)
    assert (result.p50_ms, result.p99_ms) == (10.90, 18.47)
    assert result.errors == 7


def test_microsecond_latencies() -> None:
    result = parse(REPORT.replace("10.90ms", "910.00us"))
    assert result.p50_ms == 0.91
