"""`make demo`: the whole chain on this machine, from the test bed's inventory to the load test's verdict.

The demo runs the same commands an operator runs, in order, each with its output in a log file
and a progress display on the terminal (run.py); `make demo-down` removes what it made.
"""
