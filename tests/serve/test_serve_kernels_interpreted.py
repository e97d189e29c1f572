"""The Triton 2:4 kernels themselves, run by Triton's interpreter on CPU (no GPU needed).

The interpreter executes the kernel bodies with numpy, so their indexing (slots, nibbles, masked tails,
token tiles) is checked here against the dense product; the GPU test checks the compiled code and speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' brings it on Linux)")

SCRIPT = r"""
import json, torch, triton
from maskpro.serve import sparse24 as s
from maskpro.nm import NM, topn_mask
torch.manual_seed(0)
errors = []
# (out n, in k, tokens, block_n, block_k, expand): whole and partial token tiles, one and several K tiles,
# and for the decode kernel a K that leaves a partial last tile.
cases = [(32, 256, 5, 16, 128, 0), (16, 512, 17, 16, 256, 0), (16, 256, 1, 16, 64, 0),
         (16, 384, 1, 4, 256, 2), (16, 256, 7, 8, 128, 2), (8, 512, 16, 8, 512, 2),
         (16, 384, 1, 4, 256, 3), (16, 256, 7, 8, 128, 3), (8, 512, 16, 8, 512, 3)]
for n, k, t, bn, bk, ex in cases:
    dt = torch.float16 if ex == 3 else torch.float32   # the word kernel reads pairs of 16-bit values
    w = torch.randn(n, k)
    w = (w * topn_mask(w.abs(), NM(2, 4))).to(dt)
    v, m = s.compress_24(w)
    x = torch.randn(t, k).to(dt)
    y = torch.empty(t, n, dtype=dt)
    assert s.kernel_ok(n, k, bn, bk, ex), (n, k, bn, bk, ex)
    if ex in (2, 3):
        bt = 1 if t == 1 else (4 if t <= 4 else (8 if t <= 8 else 16))
        (s._sp24_words_kernel if ex == 3 else s._sp24_gemv_kernel)[(n // bn, triton.cdiv(t, bt))](x, v, m, y, t, n, k, x.stride(0), y.stride(0),
            BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=k % bk == 0)
    else:
        bt = 16 if t <= 16 else 32
        s._sp24_kernel[(n // bn, triton.cdiv(t, bt))](x, v, m, y, t, n, k, x.stride(0), y.stride(0),
            BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk)
    ref = x.float() @ w.float().T
    errors.append([n, k, t, ex, float((y.float() - ref).abs().max() / ref.abs().max())])
print(json.dumps(errors))
"""


def test_triton_kernels_match_dense_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r[3] for r in rows} == {0, 2, 3} and len(rows) == 9
    for n, k, t, expand, err in rows:
        assert err < 1e-3, f"kernel expand={expand} on {n}x{k} with {t} tokens: max error {err}"
