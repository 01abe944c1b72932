"""`python -m gpufleet.gatewaylog` (and the gateway hosts' zipapp): the exporter without the `gpufleet` command."""

from gpufleet.gatewaylog.cli import main

raise SystemExit(main())
