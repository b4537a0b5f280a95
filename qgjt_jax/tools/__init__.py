"""Benchmarks, the TPU/GPU lowering check and the conventions benchmark:
programs that print JSON lines."""
