"""The one-machine test bed: simulated GPU hosts and engine containers on this machine's Docker.

images.py builds the test bed's images locally (no registry): the Debian base and the engine
simulator. The e2e tests and `make demo` use it; nothing here is needed on a real fleet.
"""
