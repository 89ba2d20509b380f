"""Cluster simulator: the project's own policies and schedulers in simulated time.

``python -m adrenaline.sim`` (see docs/SIMULATION.md). Layering: imports policy,
engine (Scheduler, BlockManager, Request), model config parsing and bench's pure
workload/metrics modules; never serve/ or actors/, and nothing lower imports it.
"""
