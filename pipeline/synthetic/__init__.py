"""Random-weight checkpoints built locally, for demos, tests and benchmarks."""
