# Sourced at the start of every device call (see docs/benchmarks.md, "Running on the GPU machine").
# The SmolLM2 GGUF (98 MB) exceeds one call's 64 MiB, so call 1 leaves its first half in /tmp/m and
# call 2 brings the second half plus the gguf wheel; later calls on the warm machine reuse /tmp/m.
set -e
mkdir -p /tmp/m
[ -d .xfer/a ] && cp -n .xfer/a/* /tmp/m/
if [ ! -f /tmp/m/model.gguf ] && [ -f .xfer/b/split.ab ]; then
  [ -f /tmp/m/split.aa ] || { echo "first half of the GGUF is gone (machine was recycled): run call 1 again"; exit 3; }
  cat /tmp/m/split.aa .xfer/b/split.ab > /tmp/m/model.gguf
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/m/model.gguf" | sha256sum -c
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .xfer/b/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MASKPRO_CACHE=/tmp/mpcache MASKPRO_DATA=$PWD/.xfer/data
export MODEL=/tmp/m/model.gguf
set +e
