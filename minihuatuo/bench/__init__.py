"""Benchmarks: `python -m minihuatuo.bench NAME`. Each prints ratios against a baseline measured in
the same run, on the same machine, so that numbers from different machines are comparable as ratios."""
