"""Load generation and benchmarking for OpenAI-compatible endpoints.

- ``workloads``: the request stream (random, mix, trace-length distributions, Mooncake/Azure replay),
  pure and seeded; ``build_shapes`` (no token lists, for the simulator) and ``build_workload``;
- ``arrivals``: Poisson, gamma, trace-timestamp and closed-loop arrivals;
- ``loadgen``: the asyncio streaming client recording per-chunk arrival times;
- ``metrics``: TTFT/TPOT/ITL/e2e, throughput, SLO attainment, goodput (pure);
- ``report`` and ``plots``: JSON results, terminal tables, PNG plots;
- ``cli``: ``pdserve bench`` and ``pdserve bench compare``.
"""

from __future__ import annotations
