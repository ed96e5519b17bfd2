"""Compression: pruning masks, int8 quantization, the update codec, export."""
