"""Block-local rewards for the MaskPro learner: each decoder block's masks are scored by that block's own error.

The paper's learner scores the whole model's sampled mask with one number, the change of the LM loss. Every
group of M weights then shares the credit of one scalar per step with millions of others, so a run can
only find the few changes that matter most (docs/results.md measures how little a step knows). With
``loss="local"`` every block gets its own reward: the block runs on the dense model's input to it, so no
other block's draw moves its score, and its loss is the squared error to the dense block's output, divided
by that output's mean square. Residual, moving-average baseline and update are the paper's, per block; the
logits of a block's linears move by that block's advantage.

This is the credit assignment of layer-wise pruning (SparseGPT, block re-fitting) given to the score-function
update. What it cannot see is how an error grows through later blocks; the block re-fit and fine-tune after
the learner correct for that, as they do for SparseGPT's masks.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import MaskproError
from .models import decoder_layers
from .oneshot import capture_first_layer, input_device, layer_out, to_block_device


class BlockTargets:
    """The dense model's per-block inputs and outputs on every learning batch, and the blocks' losses."""

    def __init__(self, model: nn.Module, modules: list[nn.Linear], rows: torch.Tensor, batch_size: int,
                 device: torch.device | str = "cpu"):
        layers = decoder_layers(model)
        block_of = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
        outside = [i for i, m in enumerate(modules) if id(m) not in block_of]
        if outside:
            raise MaskproError(f"--loss local scores decoder blocks, but target layer {outside[0]} is in none; "
                               "use --loss ce or kd for layers outside the blocks")
        used = sorted({block_of[id(m)] for m in modules})
        self.blocks = [layers[i] for i in used]
        position = {b: k for k, b in enumerate(used)}
        # on the learner's device: it indexes the per-block advantages every step
        self.layer_block = torch.tensor([position[block_of[id(m)]] for m in modules], device=device)
        self.n_blocks = len(used)
        # states[b][k] is the dense input of block used[k] for batch b; states[b][k + 1] its dense output when
        # the blocks are consecutive, else outputs[b][k] holds it.
        self.inputs: list[list[torch.Tensor]] = []
        self.outputs: list[list[torch.Tensor]] = []
        self.kwargs: list[dict] = []
        self.scale: list[torch.Tensor] = []
        with torch.no_grad():
            for h, kw in capture_first_layer(model, rows, input_device(model), batch_size):
                ins, outs = [], []
                for i, layer in enumerate(layers[: used[-1] + 1]):
                    h, kw = to_block_device(next(layer.parameters()).device, h, kw)
                    y = layer_out(layer(h, **kw))
                    if i in position:
                        ins.append(h)
                        outs.append(y)
                    h = y
                self.inputs.append(ins)
                self.outputs.append(outs)
                self.kwargs.append(kw)
                self.scale.append(torch.stack([y.float().pow(2).mean() for y in outs]))
        self.n_batches = len(self.inputs)

    @torch.no_grad()
    def losses(self, b: int) -> torch.Tensor:
        """Each block's normalized squared error to the dense output on batch ``b``, under the current weights."""
        errs = []
        for k, block in enumerate(self.blocks):
            h, kw = to_block_device(next(block.parameters()).device, self.inputs[b][k], self.kwargs[b])
            y = layer_out(block(h, **kw))
            errs.append((y.float() - self.outputs[b][k].float()).pow(2).mean().to(self.scale[b].device))
        return torch.stack(errs) / self.scale[b]

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in range(self.n_batches)
                   for t in (*self.inputs[b], *self.outputs[b]))
