"""Kernels: weight-only quantisation and Lamina's native C kernels (block matmuls, the fused decode step). Know nothing of the engine or its scheduler."""
