"""Answer extraction and correctness checking for evaluation benchmarks."""
