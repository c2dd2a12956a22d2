"""CPU-only speed code: host-memory settings, one CPU as several devices, backward passes for XLA:CPU."""
