"""Checkpoints: orbax train-state checkpoints (manager.py) and the published .npz format."""

from vit_jax.checkpoint.manager import best_step, create_manager, finish, restore_latest, save
from vit_jax.checkpoint.workdir import check_workdir, has_checkpoints
from vit_jax.checkpoint.record import config_changes, format_changes, record_config, saved_config
from vit_jax.checkpoint.npz import (init_from_pretrained, load_for_model, load_npz, resize_posemb,
                                    save_npz)

__all__ = ["best_step", "check_workdir", "config_changes", "create_manager", "finish", "format_changes",
           "has_checkpoints", "record_config", "restore_latest", "save", "saved_config",
           "init_from_pretrained", "load_for_model", "load_npz", "resize_posemb", "save_npz"]
