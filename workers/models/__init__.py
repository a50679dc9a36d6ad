"""Models: the model spec a driver names (`pkg.module:factory`, `path/file.py:factory`, or a
checkpoint directory), and kiln's zoo of Hugging Face architectures (decoder.py, loaded by
loader.py from a checkpoint's config.json and safetensors)."""
