"""Runtime: `KilnModel` (a compiled model with CUDA graphs and padding) and graph capture/replay."""
