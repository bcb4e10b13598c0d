"""Measured comparisons, run with ``make bench``. Each ``bench_*.py`` exposes ``main() -> None``
and prints its comparisons side by side from one run (ratios, not absolute times)."""
