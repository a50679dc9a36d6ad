"""Models: the model spec a driver names (`pkg.module:factory`, `path/file.py:factory`)."""
