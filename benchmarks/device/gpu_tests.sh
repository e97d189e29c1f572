# The last of four back-to-back device calls (the first three carry .xfer/v/c1, c2, c3 and source vllm.sh):
# installs vLLM from the parts, then runs every GPU-marked and vLLM test (gpu-tests.json) and times the
# mask learner in lean memory mode on a Llama-2-7B-shaped model (learn-llama2-7b.json), all into $OUT.
# Carry .whl and .xfer/tok as well when the machine is fresh.
set -o pipefail
source benchmarks/device/serve.sh
source benchmarks/device/vllm.sh
export PYTHONPATH=/tmp/site:/tmp/srv MASKPRO_TEST_TOKENIZER=/tmp/tok VLLM_USE_FLASHINFER_SAMPLER=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
timeout ${LEARN_S:-180} python3 -m benchmarks.cli learn --configs llama2-7b --variants maskpro-lean --steps 30 \
  --warmup 5 --naive-steps 0 --out $OUT/learn-llama2-7b.json 2>&1 | tail -5
timeout ${TESTS_S:-360} python3 -m benchmarks.cli gpu-tests --out $OUT/gpu-tests.json 2>&1 | tail -25
