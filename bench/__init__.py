"""Benchmark: what the queue costs and what it gains, against the engine alone and one-at-a-time.

`make bench` (short, 7 to 14 minutes on 2 cores) or `make bench FULL=1`; writes docs/BENCHMARKS.md,
docs/bench/results.json and docs/bench/throughput.png.
"""
