"""Every deployed form against the PyTorch reference: comparison (``pddnet validate``), reports,
benchmarks, evaluation of the reference, per-block profiles and FLOP counts."""
