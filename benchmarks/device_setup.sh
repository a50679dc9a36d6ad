# Source this on a GPU machine without Ray/pydantic/pytest (the lent H100s): unpacks the bundle
# made by ../shared/device/make-bundle.sh (.device/) and wheels in .whl/, puts the repo on
# PYTHONPATH, and keeps NVLink multicast off.
set -e
mkdir -p /tmp/pybundle && tar -xJf .device/pybundle-cp312.tar.xz -C /tmp/pybundle
. /tmp/pybundle/activate.sh
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
set +e
