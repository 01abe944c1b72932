"""Monitoring rendered from the inventory: Prometheus rules (recording and alerting) and alertmanager.yml.

`rules.render_rules(fleet)` and `alertmanager.render_alertmanager(fleet)` return the files' text;
`python -m gpufleet.monitoring.render INVENTORY OUTDIR` writes them (monitoring/README.md). The
scrape job names every rule selects on are in `gpufleet.monitoring.jobs`, for the scrape configs.
"""
