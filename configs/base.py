"""The package defaults as a runnable config: a tiny ViT on the bundled digits, 100 steps.

  vit-jax train --config configs/base.py --workdir /tmp/vit_base

Every key, its default and its meaning are declared once, in
`vit_jax/config/defaults.py`; the other files here start from them.
"""

from vit_jax.config.defaults import get_config  # noqa: F401  (the launcher calls get_config)
