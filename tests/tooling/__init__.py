"""The repository's own tools: the README commands and CI entry, the host-networking guard, the
suite's private engine, and the benchmark.
"""
