"""Tools: measurement and device-check code used by scripts/, not by training.

`benchmarking` times the training step and the input pipeline (scripts/benchmark.py,
scripts/benchmark_engines.py, scripts/benchmark_input.py); `device_check` runs one
device check -- environment, accelerator tests, train-step benchmark, input pipeline --
and writes its report (scripts/device_check.py). Nothing under efficientnet_advprop
outside this subpackage imports it.
"""
