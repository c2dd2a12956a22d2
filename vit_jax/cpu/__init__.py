"""CPU-only speed and memory code: host-memory settings, the scheduler that fits a step in memory, one CPU as
several devices, backward passes for XLA:CPU."""
