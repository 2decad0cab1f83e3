"""What runs before MindSpore starts: config, placement and parallel degrees, preflight, the data scan
and image check, checkpoint files and manifests, the run record, the planner and rank tables.

No module here imports MindSpore (a test imports each one with MindSpore blocked): the launchers run
them in their pre-flight step, and under mpirun a worker must join its cluster before MindSpore loads.
"""
