"""Benchmarks of the data path (`make bench`). Figures go to docs/performance.md."""
