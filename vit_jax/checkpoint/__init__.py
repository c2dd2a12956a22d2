"""Checkpoints: orbax train-state checkpoints (manager.py) and the published .npz format."""

from vit_jax.checkpoint.manager import (check_workdir, create_manager, finish, has_checkpoints,
                                        restore_latest, save)
from vit_jax.checkpoint.npz import (init_from_pretrained, load_for_model, load_npz, resize_posemb,
                                    save_npz)

__all__ = ["check_workdir", "create_manager", "finish", "has_checkpoints", "restore_latest", "save",
           "init_from_pretrained", "load_for_model", "load_npz", "resize_posemb", "save_npz"]
