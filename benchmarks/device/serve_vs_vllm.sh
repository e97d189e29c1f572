# The serving-load bars of issues 16 and 17: one load (maskpro-bench serve: 1 / 8 / 32 clients, 128 tokens a
# request, WikiText-2 prompts of 200 words) against vLLM 0.26.0 dense (`vllm serve` on the 2:4 model's dense
# masked weights), maskpro-serve's fast 2:4 runtime and vLLM with maskpro's plugin, in turn on one warm machine,
# then serve-compare against the dense one. Run after the calls that bring vLLM (three carrying .xfer/v/c1, c2,
# c3 for vllm.sh), carrying .whl .xfer/tok .xfer/data (serve.sh), as two calls each under ten minutes:
#   STAGE=build bash benchmarks/device/serve_vs_vllm.sh  # /tmp/m7 (random Llama-2-7B shapes, 2:4), its vLLM export
#   STAGE=load bash benchmarks/device/serve_vs_vllm.sh   # three servers, the same load, serve-vs-*.json into $OUT
# /tmp/m7 and /tmp/vp are the ones benchmarks/device/vllm_plugin.sh builds, so either script may go first.
set -o pipefail
source benchmarks/device/serve.sh
source benchmarks/device/vllm.sh
export PYTHONPATH=/tmp/site:/tmp/srv VLLM_USE_FLASHINFER_SAMPLER=0 PATH=/tmp/site/bin:$PATH
LOAD=(--concurrency 1 8 32 --max-tokens 128 --prompt-words 200 --data-dir /tmp/data --timeout 120 --out-dir $OUT)
health() { python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$1/health', timeout=5)"; }

# vllm serve FOLDER on PORT in its own session; waits for /health (at most 300 s), runs the load tagged TAG, stops it
vllm_load() {
  local folder=$1 port=$2 tag=$3 t0=$SECONDS
  setsid nohup vllm serve $folder --port $port --dtype float16 --max-num-seqs 32 --max-model-len 1024 \
    --served-model-name m7 > /tmp/$tag.log 2>&1 < /dev/null &
  local pid=$!
  until health $port 2>/dev/null; do
    sleep 2
    if ! kill -0 $pid 2>/dev/null || [ $((SECONDS - t0)) -gt 300 ]; then
      echo "$tag: vllm serve did not come up"; tail -20 /tmp/$tag.log; kill -TERM -$pid 2>/dev/null; return 3
    fi
  done
  echo "$tag: up after $((SECONDS - t0)) s"
  python3 -m benchmarks.cli serve --url http://127.0.0.1:$port/v1 --tag $tag "${LOAD[@]}" 2>&1 | grep concurrency
  kill -TERM -$pid; sleep 5; kill -KILL -$pid 2>/dev/null; sleep 2
}

case "${STAGE:-}" in
  build)
    [ -f /tmp/m7/maskpro.json ] || python3 -m benchmarks.cli random-model --config llama2-7b --tokenizer /tmp/tok \
      --out /tmp/m7 2>&1 | tail -3
    python3 -c 'from pathlib import Path; from maskpro.bench.vllm_plugin import export_for_vllm as e
print(e(Path("/tmp/m7"), Path("/tmp/vp/sparse-vllm")))' ;;
  load)
    vllm_load /tmp/m7 8001 vllm-dense-7b
    python3 -m benchmarks.cli serve --launch /tmp/m7 --serve-arg=--max-batch-size=32 \
      --serve-arg=--max-prompt-tokens=512 --serve-arg=--max-tokens=256 --startup-timeout 330 --tag maskpro-7b-2of4 \
      "${LOAD[@]}" 2>&1 | grep -E "concurrency|error|stopped"
    vllm_load /tmp/vp/sparse-vllm 8002 vllm-plugin-7b
    rm -f $OUT/*.png
    # issue 16's bars for maskpro-serve, issue 17's for the plugin
    python3 -m benchmarks.cli serve-compare --baseline $OUT/serve-vllm-dense-7b.json $OUT/serve-maskpro-7b-2of4.json \
      --bar 1:1.4 --bar 32:1.2 --out $OUT/serve-vs-vllm-maskpro.json
    python3 -m benchmarks.cli serve-compare --baseline $OUT/serve-vllm-dense-7b.json $OUT/serve-vllm-plugin-7b.json \
      --bar 1:1.3 --bar 32:1.15 --out $OUT/serve-vs-vllm-plugin.json ;;
  *) echo "usage: STAGE=build|load bash benchmarks/device/serve_vs_vllm.sh"; exit 2 ;;
esac
