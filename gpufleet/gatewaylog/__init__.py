"""The gateway's access-log exporter (`gpufleet gateway-exporter`, docs/gateway-exporter.md).

nginx's `stub_status` has no status codes, so the gateway's answers by status, client and latency
are read from its JSON access log (format `gpufleet_json`, roles/gateway/templates/gpufleet.conf.j2):
`follower` tails the file across rotations, `parser` turns a line into an `AccessRecord`, `stats`
accumulates them, `collector` renders them for Prometheus, `service` runs it all, `cli` is the
command line.

This package is shipped to gateway hosts on its own (a zipapp with prometheus_client and nothing
else of gpufleet's dependencies): its modules import only the standard library, prometheus_client
and each other (tests/unit/test_gatewaylog_cli.py checks it).
"""
