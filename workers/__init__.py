"""The rank side of kiln: one worker per rank, and everything it runs.

Sub-packages, imports pointing one way (the actor uses runtime, runtime uses compilation,
compilation uses the layers and the config):

- `config/`       CompilationConfig, its checks, JSON I/O, PassConfig (no torch)
- `compilation/`  trace-once, split, structural hash, Inductor artifacts, factors, passes
- `runtime/`      KilnModel, CUDA graphs, padding
- `layers/`       custom ops, layers, attention, tensor-parallel state and collectives
- `models/`       model specs (and the model zoo)
- `worker.py`     the Ray actor; `protocol.py` its typed messages; `progress.py` the progress board
"""
