"""Compilation: trace once with Dynamo, split at the splitting ops, hash each piece's structure,
compile it with Inductor into a relocatable artifact (or load one), and the cache-key factors.
Everything here that touches torch's private APIs does so through `kiln.workers.torch_internals`."""
