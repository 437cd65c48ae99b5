"""wg-autopeer's benchmarks (issue 6): ``python -m bench.run [--quick]``."""
