"""Quantization: integer quantizers, INT4 packing, quantized-tensor pytree, FMPQ algorithms."""
