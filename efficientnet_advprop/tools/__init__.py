"""Tools: measurement and device-check code used by scripts/, not by training.

`step_configs` names the benchmark configurations (backend-neutral); `benchmarking`
times the TensorFlow training step and the input pipeline (scripts/benchmark.py,
scripts/benchmark_engines.py, scripts/benchmark_input.py); `device_check` and
`jax_device_check` run one device check on the TensorFlow or the JAX engine and write
its report (scripts/device_check.py). Nothing under efficientnet_advprop outside this
subpackage imports it.
"""
