"""Scheduling core: sequences, the KV block manager and the continuous-batching scheduler."""
