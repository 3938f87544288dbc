"""tessmirror's benchmark suite: every scenario of issue 6 against the local archive and the peers.

Run it with `.venv/bin/python -m benchmarks.run --out bench-out` (see benchmarks/README.md).
"""
