"""Load tests of the serving stack: Locust users that time streaming LLM APIs, load shapes, the
SLO gate and the report. `record.py` holds the one per-request record every part exchanges.
"""
