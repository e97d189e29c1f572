# vllm-plugin.json (issue 17): vLLM 0.26.0 + maskpro's plugin against vLLM dense on the same masked weights.
# Run after the calls that bring vLLM (three carrying .xfer/v/c1, c2, c3 for vllm.sh), the SmolLM2 GGUF
# (.xfer/a, then .xfer/b for setup.sh) and .whl + .xfer/tok (serve.sh), as two more calls on the same warm
# machine, each well inside one call's 10 minutes:
#   bash benchmarks/device/vllm_plugin.sh build   # /tmp/m7 (Llama-2-7B shapes, random, 2:4), /tmp/s2 (SmolLM2
#                                                 # 2:4), both exported for vLLM into /tmp/vp
#   bash benchmarks/device/vllm_plugin.sh bench   # vLLM dense then plugin on /tmp/m7, the greedy check on /tmp/s2
# The bench reuses the exports in /tmp/vp (their sources are unchanged), so its call holds only engine time.
set -o pipefail
source benchmarks/device/setup.sh
source benchmarks/device/serve.sh
source benchmarks/device/vllm.sh
export PYTHONPATH=/tmp/site:/tmp/srv VLLM_USE_FLASHINFER_SAMPLER=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
case "$1" in
  build)
    # Magnitude 2:4 is enough here: the check compares the plugin with dense on the same masked weights.
    [ -f /tmp/m7/maskpro.json ] || python3 -m benchmarks.cli random-model --config llama2-7b --tokenizer /tmp/tok \
      --out /tmp/m7 2>&1 | tail -3
    [ -f /tmp/s2/maskpro.json ] || python3 -m maskpro.cli prune --model $MODEL --method magnitude --nm 2:4 \
      --dtype fp16 --out /tmp/s2 -q 2>&1 | tail -3
    python3 -c 'from pathlib import Path; from maskpro.bench.vllm_plugin import export_for_vllm as e
print(e(Path("/tmp/m7"), Path("/tmp/vp/sparse-vllm")), e(Path("/tmp/s2"), Path("/tmp/vp/smollm2-vllm")))' ;;
  bench)
    timeout ${BENCH_S:-570} python3 -m benchmarks.cli vllm-plugin --sparse /tmp/m7 --smollm2 /tmp/s2 --work /tmp/vp \
      --points 1:512 4:512 16:512 --new 128 --reps 5 --out $OUT/vllm-plugin.json 2>&1 | tail -40 ;;
  *) echo "usage: bash benchmarks/device/vllm_plugin.sh build|bench"; exit 2 ;;
esac
