#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git) the wheels that the GPU image of the device tool lacks and omni imports:
# grain, tensorflow-datasets, ml-collections, tensorboardX and what they need beyond that image's packages
# (its Python is 3.12). Run here, where PyPI is reachable; benchmarks/device_check.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  ml-collections grain tensorflow-datasets tensorboardX array-record dm-tree portpicker simple-parsing \
  docstring-parser immutabledict tensorflow-metadata googleapis-common-protos termcolor toml
python3 -m pip wheel -q --no-deps -w .whl promise  # pure Python, published as source only
du -sh .whl
