"""runtime.bench: offline throughput and latency benchmarks, and a client that benchmarks any
OpenAI-compatible server (ours, vLLM's, llama.cpp's) for TTFT, TPOT, ITL, end-to-end latency,
throughput and goodput.

``runtime bench throughput | latency | serve`` is the command line (see ``runtime.bench.cli``);
the pieces are importable on their own: :mod:`.datasets` makes workloads, :mod:`.metrics`
turns per-request timings into the summary, :mod:`.serve` drives a server.
"""
