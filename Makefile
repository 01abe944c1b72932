# gpufleet — `make help` lists the targets. `make test` and `make demo` set up everything they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
LOADTEST_ARGS ?=

.PHONY: help setup venv test test-unit test-integration test-e2e images lint plan validate docs testbed-up testbed-down provision serve monitoring loadtest rollout demo demo-down bench bench-demo clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  make %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: ## install Python deps into .venv and start Docker (apt packages too on a fresh Debian/Ubuntu machine, as root)
	@scripts/bootstrap.sh

# .venv only, for the targets that need no Docker (not in `make help`: use setup)
venv:
	@scripts/bootstrap.sh --no-docker

test: setup lint ## run every test tier (unit, integration, e2e) after lint; e2e builds its images on first use
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: venv ## run the fast unit tests only
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

test-integration: venv ## run the integration tests (real CLI and pyinfra runs on loopback/local)
	$(BIN)/pytest -m integration $(PYTEST_ARGS)

test-e2e: setup ## run the e2e tests (containers on this machine's Docker; builds the images if needed)
	$(BIN)/pytest -m e2e $(PYTEST_ARGS)

images: setup ## build the test bed's images if missing or out of date: base, host, simulator and check image
	$(BIN)/python -m gpufleet.testbed.images

lint: venv ## ruff over the code and tests
	$(BIN)/ruff check gpufleet roles deploy inventories tests benchmarks loadtests

plan: venv ## capacity plan of the example fleet (the seed's 4x RTX 4090D hosts)
	$(BIN)/gpufleet plan inventories/example

validate: venv ## validate the example fleet, secrets included
	$(BIN)/gpufleet validate inventories/example

docs: venv ## regenerate docs/configuration.md from the schema
	$(BIN)/python -m gpufleet.docs_gen > docs/configuration.md

testbed-up: setup ## start the test bed hosts of inventories/local (2 simulated GPU hosts, a monitoring host, stand-in mirror)
	$(BIN)/python -m gpufleet.testbed up inventories/local

testbed-down: setup ## remove the test bed hosts of inventories/local
	$(BIN)/python -m gpufleet.testbed down inventories/local

provision: setup ## converge the test bed hosts with deploy/gpu.py (driver, CUDA, Docker, container toolkit)
	$(BIN)/pyinfra -y inventories/local/inventory.py deploy/gpu.py

serve: setup ## start the engines (the simulator) and their nginx gateway on the provisioned test bed hosts
	$(BIN)/pyinfra -y inventories/local/inventory.py deploy/serving.py
	$(BIN)/pyinfra -y inventories/local/inventory.py deploy/gateway.py

monitoring: setup ## exporters on every test bed host; Prometheus, Alertmanager, Grafana on mon-01 (after serve)
	$(BIN)/pyinfra -y inventories/local/inventory.py deploy/monitoring.py

loadtest: setup ## the SLO ramp through the test bed's gateway (after site.py): verdict, report in reports/; LOADTEST_ARGS=... adds options
	$(BIN)/gpufleet loadtest inventories/local $(LOADTEST_ARGS)

rollout: setup ## rolling update of the test bed's engines to the inventory's current spec (deploy/rollout.py)
	$(BIN)/pyinfra -y inventories/local/inventory.py deploy/rollout.py

bench: setup ## run the benchmarks in benchmarks/ and print their figures (about 20 minutes)
	$(BIN)/python benchmarks/bench_inventory.py
	$(BIN)/python benchmarks/bench_sim_capacity.py
	$(BIN)/python benchmarks/bench_gpu_rerun.py
	$(BIN)/python benchmarks/bench_gateway_ttft.py
	$(BIN)/python benchmarks/bench_exporter.py
	$(BIN)/python benchmarks/bench_loadtest_client.py

bench-demo: setup ## time make demo cold (after demo-down: images rebuilt) and warm; removes the test bed and images (about 20 minutes)
	$(BIN)/python benchmarks/bench_demo.py

demo: setup ## the whole chain on this machine: images, test bed, deploy/site.py, SLO ramp through the gateway, verdict and URLs
	$(BIN)/python -m gpufleet.demo up

demo-down: ## remove everything make demo made: test bed hosts, their keys, the images, the caches (reports stay)
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m gpufleet.demo down --all; else echo "make demo-down: no .venv, so make demo never ran here"; fi

clean: ## remove the virtualenv and caches (images stay in Docker: docker rmi gpufleet/sim:... to drop them)
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .cache/testbed
