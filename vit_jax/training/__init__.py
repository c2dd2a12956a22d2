"""Training: the train state and steps (steps.py), the loop (loop.py), optimizer, mesh and shardings,
preemption, metrics and memory accounting.

Importing `vit_jax.training.steps` loads no TensorFlow; the loop does (its data pipeline).
"""
