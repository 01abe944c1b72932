"""gpufleet's engine simulator: a labelled stand-in that speaks vLLM's and TGI's APIs and metrics.

It is never presented as a real engine: `/version` says `gpufleet-sim`, and `/metrics` carries
`gpufleet_sim_info`. The HTTP surfaces (vllm_api.py, tgi_api.py) sit on one continuous-batching
model (engine.py, scheduler.py) whose timing comes from a named performance profile (profile.py).
"""
