"""Device backends: backend.backend_for picks what a run takes from its backend; cpu/ holds the CPU one."""
