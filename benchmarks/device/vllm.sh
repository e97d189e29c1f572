# Sourced on the GPU machine: gathers the vLLM 0.26.0 parts (../shared/engines/vllm-0.26/make_parts.sh .xfer/v,
# one part carried per call into /tmp/v), installs vLLM into /tmp/site once all three are there, and installs
# this checkout (no dependencies: the image has them) so maskpro.serve and maskpro.bench import.
mkdir -p /tmp/v
for part in c1 c2 c3; do [ -d .xfer/v/$part ] && cp -rn .xfer/v/$part /tmp/v/; done
if [ -d /tmp/v/c1 ] && [ -d /tmp/v/c2 ] && [ -d /tmp/v/c3 ] && [ ! -d /tmp/site/vllm ]; then
  cat /tmp/v/c1/vllm.whl.part0 /tmp/v/c2/vllm.whl.part1 /tmp/v/c3/vllm.whl.part2 \
    > /tmp/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    /tmp/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl /tmp/v/c3/*.whl
fi
python3 -m pip show maskpro >/dev/null 2>&1 || python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
export MASKPRO_COMPILE_CACHE=/tmp/inductor
