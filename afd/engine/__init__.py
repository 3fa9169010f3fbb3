"""The engine core: request state, executors (one process or the disaggregated cluster), the
single-process model runner and the thread-safe async front of the engine."""
