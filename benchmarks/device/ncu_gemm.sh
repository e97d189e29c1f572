# Why the mma.sp GEMM at 64 tokens runs at ~2x its read floor (docs/kernels.md): Nsight Compute on one layer
# shape, the plan's medium-batch config and the decode kernel, memory and issue-stall sections, into $OUT.
# Usage on the GPU machine: SHAPE=4096x4096 TOKENS=64 bash benchmarks/device/ncu_gemm.sh
set -o pipefail
python3 -m pip show maskpro >/dev/null 2>&1 || python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
SHAPE=${SHAPE:-4096x4096} TOKENS=${TOKENS:-64}
cat > /tmp/ncu_probe.py <<'PY'
import os, torch
from maskpro.nm import NM, topn_mask
from maskpro.serve import sparse_gemm, sparse_mma
from maskpro.serve.sparse24 import compress_24
k, n = (int(v) for v in os.environ["SHAPE"].split("x"))
t = int(os.environ["TOKENS"])
w = torch.randn(n, k, device="cuda")
w = (w * topn_mask(w.abs(), NM(2, 4))).half()
tiles, pos = sparse_mma.mma_layout(*compress_24(w))
x = torch.randn(t, k, device="cuda", dtype=torch.half)
sms = torch.cuda.get_device_properties(0).multi_processor_count
cfg = sparse_gemm.medium_default(n, k, t, sms)
for _ in range(3):
    sparse_gemm.sparse_gemm(x, tiles, pos, n, cfg)
    sparse_mma.sparse_mma_mm(x, tiles, pos, n, sparse_mma.DEFAULT_CONFIG)
torch.cuda.synchronize()
print("config", cfg)
PY
SHAPE=$SHAPE TOKENS=$TOKENS ncu --target-processes all -k regex:sp24 -s 4 -c 2 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
  --section LaunchStats --section SchedulerStats python3 /tmp/ncu_probe.py > $OUT/ncu-$SHAPE-$TOKENS.txt 2>&1
tail -120 $OUT/ncu-$SHAPE-$TOKENS.txt | grep -v "^==PROF==" | head -150
