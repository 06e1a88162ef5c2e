#!/usr/bin/env bash
# The Python packages a JAX-only GPU machine lacks, as a local wheel folder.
#
# The GPU machines this project can borrow have jax (CUDA), numpy, Pillow, absl-py,
# h5py, rich, ml-dtypes, torch and timm, but not Keras 3 and two of its needs, and no
# internet. Here (online):
#
#   bash scripts/offline_wheels.sh download [DIR]     # DIR defaults to .whl
#
# fetches keras, optree and namex at the versions installed in this environment (the
# ones the tests ran with) as CPython 3.12 x86-64 wheels (the machines' Python; set
# PYTHON_VERSION=3.11 etc. for another), about 3 MB, and copies the CIFAR-10 tarball
# (../shared/data/cifar10-train-jpeg.tar.gz, 16 MB) into DIR/data so that it travels
# with the checkout. There (offline):
#
#   bash scripts/offline_wheels.sh install [DIR] [TARGET]  && export PYTHONPATH=TARGET
#
# installs the wheels without the index and without their dependencies (all already on
# the machine) into TARGET (default /tmp/site), leaving the machine's environment
# untouched; then checks that keras imports on the JAX backend. The scripts put this
# checkout on sys.path themselves, so the project needs no install there.
set -euo pipefail
cd "$(dirname "$0")/.."
action="${1:-}"
dir="${2:-.whl}"
case "$action" in
  download)
    versions=$(python3 - <<'PY'
from importlib import metadata
print(" ".join(f"{n}=={metadata.version(n)}" for n in ("keras", "optree", "namex")))
PY
)
    mkdir -p "$dir/data"
    rm -f "$dir"/*.whl
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: \
      --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$dir" $versions
    tarball=../shared/data/cifar10-train-jpeg.tar.gz
    if [ -f "$tarball" ]; then
      cp "$tarball" "$dir/data/"
    else
      echo "offline_wheels.sh: $tarball not found; the claims' GPU tier needs it in $dir/data" >&2
    fi
    du -sh "$dir"
    ls "$dir"
    ;;
  install)
    target="${3:-/tmp/site}"
    shopt -s nullglob
    wheels=("$dir"/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
      echo "offline_wheels.sh: no wheels in $dir (run 'download' where pip reaches PyPI)" >&2
      exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$target" "${wheels[@]}"
    PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" KERAS_BACKEND=jax python3 -c \
      "import keras, jax; print('keras', keras.__version__, 'on', keras.backend.backend(), \
'with jax', jax.__version__, [d.device_kind for d in jax.devices()])"
    ;;
  *)
    echo "usage: bash scripts/offline_wheels.sh download [DIR] | install [DIR] [TARGET]" >&2
    exit 2
    ;;
esac
