"""Runtime: `KilnModel` (a compiled model with CUDA graphs and padding) and graph capture/replay;
`kiln.compile` for any nn.Module (compiled_module); greedy generation (generation)."""
