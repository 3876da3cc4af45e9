"""Measuring: image metrics, blockwise evaluation, figures, throughput benchmarks."""
