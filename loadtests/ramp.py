"""The seed's step ramp as a Locust load shape: add it to the users' locustfile.

    locust -f loadtests/locustfile.py,loadtests/ramp.py --headless --host http://127.0.0.1:8080 \
        --gpufleet-concurrency 1,4,8,16,32,64 --gpufleet-warmup-s 30 --gpufleet-measure-s 120

Each step runs that many users at once, closed loop; requests sent during a step's warm-up are
labelled `warmup:` and left out of its figures. The run ends by itself after the last step.
"""

from locust import events

from gpufleet.loadtest import shape_options
from gpufleet.loadtest.shapes import StepRampShape


class SeedRamp(StepRampShape):
    """Concurrency steps from `--gpufleet-concurrency` (default the seed's 1, 4, 8, 16, 32, 64)."""


shape_options.install(events)
