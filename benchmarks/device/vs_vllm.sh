# Issue 16's table (vs-vllm-dense.json) in four back-to-back device calls on one warm machine: calls 1-3 carry
# .xfer/v/c1, c2, c3 (the vLLM 0.26.0 parts); call 3 also runs vLLM dense (STAGE=vllm, into /tmp, which the
# warm machine keeps) and call 4 maskpro's dense and 2:4 runtimes against it (STAGE=maskpro), each under one
# call's ten minutes. POINTS, TAG and EXTRA (more generate options, e.g. --no-expand-ahead) may be set; the
# JSON lands in $OUT.
set -o pipefail
source benchmarks/device/vllm.sh
POINTS=${POINTS:-"1:512 4:512 16:512 64:512 1:2048"}
TAG=${TAG:-$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -o 'H[0-9]*' | head -1 | tr H h)}
filter() { grep -v "DEBUG\|torch.__trace"; }
case "${STAGE:-}" in
  vllm)
    timeout 540 python3 -m maskpro.bench.vllm_dense --config llama2-7b --new 128 --reps 3 --points $POINTS \
      > /tmp/vllm-dense.out 2> >(filter | tail -20 >&2)
    tail -1 /tmp/vllm-dense.out > /tmp/vllm-dense.json && cp /tmp/vllm-dense.json $OUT/ ;;
  maskpro)
    timeout 560 python3 -m benchmarks.cli generate --runtime fast --vllm-results /tmp/vllm-dense.json \
      --points $POINTS --dense-points 1:512 4:512 --reps 3 --tag $TAG --out $OUT/generate-$TAG.json ${EXTRA:-} 2>&1 \
      | filter | tail -30 ;;
  *) echo "parts gathered: $(ls /tmp/v 2>/dev/null | tr '\n' ' ')" ;;
esac
