# Source this on a GPU machine whose Python lacks Ray/pydantic/pytest: unpacks a Python bundle
# (.device/pybundle-cp312.tar.xz, a relocatable Python with kiln's dependencies) and installs
# any wheels in .whl/, both under $TMPDIR (default /tmp); puts the repo on PYTHONPATH; and keeps
# NVLink multicast off (NCCL NVLS, symmetric memory, NVSHMEM), which some GPU hosts don't allow.
set -e
KILN_TMP="${TMPDIR:-/tmp}"
mkdir -p "$KILN_TMP/pybundle" && tar -xJf .device/pybundle-cp312.tar.xz -C "$KILN_TMP/pybundle"
. "$KILN_TMP/pybundle/activate.sh"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$KILN_TMP/site" .whl/*.whl
  export PYTHONPATH="$KILN_TMP/site:$PYTHONPATH"
fi
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset KILN_TMP
set +e
