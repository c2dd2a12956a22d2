"""`python -m vit_jax COMMAND [FLAGS]`: the same as `vit-jax COMMAND [FLAGS]`."""

import sys

from vit_jax import cli

sys.exit(cli.main())
