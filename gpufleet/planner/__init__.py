"""Capacity planning: what fits on a host's GPUs, and the engine flags that follow."""
