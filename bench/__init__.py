"""Benchmarks: each measures LoopMesh against a baseline in the same run and prints ratios."""
