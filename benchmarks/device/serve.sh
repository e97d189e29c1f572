# Sourced on the GPU machine for serving runs and GPU tests. The first call carries .whl (the server's wheels
# at this project's pins: fastapi, uvicorn, httpx, prometheus-client and their needs, opentelemetry-api
# included, which fastapi imports; the image has none),
# .xfer/tok (SmolLM2's tokenizer files, 3.4 MB) and .xfer/data (WikiText-2 test, for prompts); later calls on
# the warm machine reuse /tmp/srv, /tmp/tok and /tmp/data. Installs this checkout without dependencies.
if [ -d .whl ] && [ ! -d /tmp/srv/opentelemetry ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/srv .whl/*.whl
fi
[ -d .xfer/tok ] && mkdir -p /tmp/tok && cp -n .xfer/tok/* /tmp/tok/
[ -d .xfer/data ] && mkdir -p /tmp/data && cp -rn .xfer/data/* /tmp/data/
python3 -m pip show maskpro >/dev/null 2>&1 || python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
export PYTHONPATH=/tmp/srv PYTHONUNBUFFERED=1 MASKPRO_COMPILE_CACHE=/tmp/inductor MASKPRO_TEST_TOKENIZER=/tmp/tok
export MASKPRO_DATA=/tmp/data
