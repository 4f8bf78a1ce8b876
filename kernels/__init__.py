"""Fused distillation-loss kernels (Triton) and their exact PyTorch reference; imported as kdbench.kernels."""
