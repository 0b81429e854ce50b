"""Measurement: timing (torch.utils.benchmark / CUDA events), memory (tracker, RSS, CUDA, NVML), FLOPs, environment."""
