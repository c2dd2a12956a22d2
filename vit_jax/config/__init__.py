"""Config defaults (every key, declared once) and reading config files and workdir configs."""
