# One device call (timeout 600 s), carry .whl .xfer/tok .xfer/data: build a random Llama-2-7B-shaped 2:4 model,
# start maskpro-serve on it, run the 64-client mixed soak, write serve-<tag>.json and the server log
# to $OUT (the build and the server start take minutes; the soak SOAK_S seconds, 300 by default).
set -o pipefail
source benchmarks/device/serve.sh
T0=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
[ -d /tmp/m7 ] || python3 -m benchmarks.cli random-model --config llama2-7b --tokenizer /tmp/tok --out /tmp/m7 2>&1 | tail -3
echo "build_s=$((SECONDS-T0))" | tee -a $OUT/gpu.txt
T1=$SECONDS
setsid nohup python3 -m maskpro.serve.cli /tmp/m7 --port 8000 --max-batch-size 64 --max-prompt-tokens 512 \
  --max-tokens 256 > /tmp/serve.log 2>&1 < /dev/null &
SERVER=$!
health() { python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=5).read().decode())"; }
until health >/dev/null 2>&1; do
  sleep 2
  kill -0 $SERVER 2>/dev/null || { echo "server exited"; tail -30 /tmp/serve.log; cp /tmp/serve.log $OUT/; exit 4; }
  if [ $((SECONDS-T1)) -gt 330 ]; then echo "server not up after 330 s"; tail -30 /tmp/serve.log; cp /tmp/serve.log $OUT/; exit 3; fi
done
echo "startup_s=$((SECONDS-T1))" | tee -a $OUT/gpu.txt
DUR=${SOAK_S:-300}
echo "soak duration ${DUR}s" | tee -a $OUT/gpu.txt
python3 -m benchmarks.cli serve --url http://127.0.0.1:8000/v1 --concurrency 64 --duration $DUR --mixed \
  --disconnect-rate 0.1 --sample-memory 2 --max-tokens 256 --prompt-words 200 --data-dir /tmp/data \
  --timeout 120 --tag h200-llama2-7b-2of4-soak --out-dir $OUT 2>&1 | tail -25
health > $OUT/health-after.json
kill -TERM $SERVER; sleep 3
cp /tmp/serve.log $OUT/
