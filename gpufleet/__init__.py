"""gpufleet: provision NVIDIA GPU servers into a monitored, rate-limited LLM inference service."""

__version__ = "0.1.0"
