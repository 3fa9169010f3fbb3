"""The cluster driver: the disaggregated executor (`executor.AFDExecutor`, layout, spawning,
step plans), `recovery` (re-forming the data plane after a failure) and `supervisor` (worker
processes, restarts, hang detection)."""
