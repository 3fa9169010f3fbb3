"""Offline planner: step model, hardware presets, profiler, published points and the search."""
