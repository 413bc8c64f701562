"""Cluster simulator, performance models, hardware and model catalogues, and the capacity planner.

Entry points: ``pdserve sim`` / ``plan`` / ``profile`` (``pdserve.sim.cli.register``), and in Python
``Simulator(ClusterSpec, work_items(WorkloadConfig), SimOptions()).run()``.
"""
