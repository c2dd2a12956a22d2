"""Checkpoints: orbax train-state checkpoints (manager.py) and the published .npz format."""

from vit_jax.checkpoint.manager import create_manager, restore_latest, save

__all__ = ['create_manager', 'restore_latest', 'save']
