"""Speed and memory: step caching, quantization, offloading, compile, export (Denoiser wrappers and placements)."""
