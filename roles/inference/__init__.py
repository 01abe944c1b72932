"""Role inference: the engine containers of a GPU host (vLLM, TGI or gpufleet's simulator).

spec.py builds each instance's container spec from the host's plan and settings; the deploy
function that converges the containers to those specs lands with the serving issue (5).
"""
