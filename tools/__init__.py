"""Developer tools: set-up helpers and a local multi-node Ray cluster (not part of the wheel)."""
