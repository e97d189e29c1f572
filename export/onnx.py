"""Causal LM to a generation-ready ONNX graph with KV cache, checked for N:M and run against PyTorch.

The graph follows the input/output names that ONNX Runtime GenAI, Optimum and TensorRT's ONNX parser
users expect: ``input_ids`` [batch, sequence], ``attention_mask`` [batch, total_sequence],
``position_ids`` [batch, sequence], ``past_key_values.{i}.key|value`` [batch, kv_heads, past_sequence,
head_dim] in, ``logits`` and ``present.{i}.key|value`` out. An empty past (length 0) is a prefill.

PyTorch's TorchScript-based exporter (``dynamo=False``) is used: it turns transformers' cache and mask
code into a static graph with symbolic batch/sequence dimensions on torch 2.11-2.13, where the dynamo
exporter needs per-model dynamic-shape plumbing. The export folder is written atomically and holds the
tokenizer, config and ``maskpro.json`` next to ``model.onnx`` so it is self-describing.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import resource
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from maskpro.artifacts import read_metadata, seal
from maskpro.checkpoint import atomic_path, save_json
from maskpro.errors import MaskproError
from maskpro.models import cache_kwarg, parse_dtype

from .check import CheckReport, check_folder, check_onnx

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
REPORT_FILE = "export-report.json"
_COPIED = ("config.json", "generation_config.json", "masks.safetensors", "tokenizer.json",
           "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")


@dataclass
class OnnxExportConfig:
    dtype: str = "fp32"                 # fp32 | fp16 | bf16; TensorRT 10+ engines run in the ONNX's dtype
    opset: int = 17
    parity: bool = True                 # run onnxruntime against PyTorch on real text after export
    parity_prompt_tokens: int = 64
    parity_new_tokens: int = 16
    data_root: str | None = None        # where WikiText-2 is (parity text); default ../shared/data


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


class KVCacheLM(nn.Module):
    """The model as a function of flat tensors, so an exporter can trace the KV cache in and out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers
        self.cache_kw = cache_kwarg(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_kw: cache})
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def kv_shape(config, batch: int, past: int) -> tuple[int, int, int, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return batch, getattr(config, "num_key_value_heads", heads) or heads, past, head_dim


def _dynamic_axes(n_layers: int) -> dict[str, dict[int, str]]:
    ins, outs = io_names(n_layers)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in ins[3:]})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in outs[1:]})
    return axes


def export_graph(model: nn.Module, path: Path, opset: int = 17) -> None:
    """Trace ``model`` (a transformers causal LM) into ``path`` + ``model.onnx.data``.

    Dynamic batch/sequence/past axes. The weights are traced as graph inputs (so the exporter never
    serialises the model in one protobuf, which costs several times the model's memory) and then written
    tensor by tensor into one page-aligned external-data file as initializers named like the Hugging Face
    parameters. A Linear's ``Transpose(W) -> MatMul`` becomes ``MatMul`` on a stored ``W.T`` (``(K, out)``),
    the layout ONNX runtimes and TensorRT's parser take as constant weights.
    """
    import onnx

    cfg = model.config
    wrapper = KVCacheLM(model).eval()
    dtype = next(model.parameters()).dtype
    batch, seq, past = 2, 3, 2  # distinct sizes so no axis is mistaken for another while tracing
    example = (torch.ones(batch, seq, dtype=torch.long), torch.ones(batch, past + seq, dtype=torch.long),
               torch.arange(past, past + seq).expand(batch, seq).contiguous(),
               *[torch.zeros(kv_shape(cfg, batch, past), dtype=dtype) for _ in range(2 * wrapper.n_layers)])
    ins, outs = io_names(wrapper.n_layers)
    weights = dict(wrapper.named_parameters())
    with torch.no_grad(), warnings.catch_warnings(), _placeholder_weights(wrapper):
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
        torch.onnx.export(wrapper, example, str(path), input_names=ins, output_names=outs,
                          dynamic_axes=_dynamic_axes(wrapper.n_layers), opset_version=opset, dynamo=False,
                          export_params=False, do_constant_folding=False)
    proto = onnx.load(str(path))
    _attach_weights(proto, weights | dict(wrapper.named_buffers()), len(ins),
                    path.with_name(DATA_FILE))
    onnx.save_model(proto, str(path))


@contextmanager
def _placeholder_weights(module: nn.Module) -> Iterator[None]:
    """Swap every parameter for a one-element tensor expanded to its shape while tracing.

    The tracer clones every parameter, and running the real weights pulls the whole model into memory
    besides; placeholders keep the export near one model's size. Each gets its own value (the exporter
    merges equal weights) and tied parameters stay tied. The real tensors are restored afterwards.
    """
    saved, fakes = [], {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in fakes:
                value = torch.full((), float(len(fakes) + 1), dtype=p.dtype)
                fakes[id(p)] = nn.Parameter(value.expand(p.shape), requires_grad=False)
            saved.append((mod, name, p))
            mod._parameters[name] = fakes[id(p)]
    try:
        yield
    finally:
        for mod, name, p in saved:
            mod._parameters[name] = p


_ONNX_TYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}  # onnx.TensorProto data types
_ALIGN = 4096  # page-aligned offsets let runtimes memory-map the weights


def _attach_weights(proto, params: dict[str, torch.Tensor], n_real_inputs: int, data_path: Path) -> None:
    """Turn the traced weight inputs into external initializers, folding ``Transpose`` into the data."""
    import onnx

    graph = proto.graph
    weight_inputs = [vi.name for vi in graph.input[n_real_inputs:]]
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    drop, inits, offset = [], [], 0
    with open(data_path, "wb") as fh:
        def add(name: str, t: torch.Tensor) -> None:
            nonlocal offset
            raw = t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
            tensor = onnx.TensorProto(name=name, dims=list(t.shape), data_type=_ONNX_TYPES[t.dtype],
                                      data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(len(raw)))):
                tensor.external_data.add(key=key, value=value)
            fh.write(raw)
            offset += len(raw)
            pad = -offset % _ALIGN
            fh.write(b"\0" * pad)
            offset += pad
            inits.append(tensor)

        for traced in weight_inputs:
            t, name = params[traced], traced.removeprefix("model.")
            direct = [n for n in consumers.get(traced, []) if n.op_type != "Transpose"]
            for tnode in [n for n in consumers.get(traced, []) if n.op_type == "Transpose"]:
                perm = [list(a.ints) for a in tnode.attribute if a.name == "perm"]
                if t.dim() != 2 or (perm and perm[0] != [1, 0]):
                    direct.append(tnode)
                    continue
                add(f"{name}.T", t.T)  # stored as the MatMul operand (K, out)
                for user in consumers.get(tnode.output[0], []):
                    user.input[:] = [f"{name}.T" if x == tnode.output[0] else x for x in user.input]
                drop.append(tnode)
            if direct:
                add(name, t)
                for user in direct:
                    user.input[:] = [name if x == traced else x for x in user.input]
    for node in drop:
        graph.node.remove(node)
    del graph.input[n_real_inputs:]
    graph.initializer.extend(inits)


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _np_dtype(dtype: torch.dtype):
    import numpy as np

    return {torch.float16: np.float16, torch.float32: np.float32}.get(dtype, np.float32)


def onnx_step(session, n_layers: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              past: list, config, float_dtype) -> tuple:
    """One ONNX Runtime call: prefill (empty past) or decode; returns (logits, present) as numpy."""
    import numpy as np

    batch, seq = input_ids.shape
    if not past:
        past = [np.zeros(kv_shape(config, batch, 0), dtype=float_dtype)] * (2 * n_layers)
    p = past[0].shape[2]
    # Left padding: positions count only the real tokens, as transformers' generate() does.
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, p:p + seq]
    ins, _ = io_names(n_layers)
    feeds = dict(zip(ins, [input_ids.numpy(), attention_mask.numpy(), pos.numpy(), *past]))
    out = session.run(None, feeds)
    return out[0], out[1:]


@dataclass
class TorchReference:
    """What PyTorch computed on the parity text: kept so the model can be freed before ONNX Runtime runs."""

    input_ids: torch.Tensor
    logits: torch.Tensor
    greedy_tokens: list[int]


def torch_reference(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> TorchReference:
    ids = input_ids[None, :]
    cfg = model.config
    with torch.no_grad():
        logits = model(ids).logits.float()
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens,
                             pad_token_id=cfg.eos_token_id if cfg.pad_token_id is None else cfg.pad_token_id)
    return TorchReference(input_ids, logits, gen[0, ids.shape[1]:].tolist())


def parity(onnx_path: Path, ref: TorchReference, config, dtype: torch.dtype) -> dict:
    """ONNX Runtime against PyTorch on the same tokens: prefill logit error, then greedy decoding with cache."""
    import numpy as np

    if dtype == torch.bfloat16:
        return {"skipped": "onnxruntime's CPU provider has no bf16 kernels; export fp32 or fp16 to compare"}
    n_layers, np_dtype = config.num_hidden_layers, _np_dtype(dtype)
    session = _session(onnx_path)
    ids = ref.input_ids[None, :]
    mask = torch.ones_like(ids)
    t0 = time.perf_counter()
    logits, past = onnx_step(session, n_layers, ids, mask, [], config, np_dtype)
    prefill_s = time.perf_counter() - t0
    got = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    err = (got - ref.logits).abs()
    tokens = []
    nxt = int(got[0, -1].argmax())
    for _ in range(len(ref.greedy_tokens)):
        tokens.append(nxt)
        mask = torch.ones(1, mask.shape[1] + 1, dtype=torch.long)
        logits, past = onnx_step(session, n_layers, torch.tensor([[nxt]]), mask, past, config, np_dtype)
        nxt = int(np.asarray(logits)[0, -1].argmax())
    return {"prompt_tokens": int(ids.shape[1]), "new_tokens": len(tokens),
            "max_abs_logit_error": float(err.max()), "mean_abs_logit_error": float(err.mean()),
            "max_logit_magnitude": float(ref.logits.abs().max()),
            "prefill_argmax_agreement": float((got.argmax(-1) == ref.logits.argmax(-1)).float().mean()),
            "greedy_tokens_onnx": tokens, "greedy_tokens_torch": ref.greedy_tokens,
            "greedy_identical": tokens == ref.greedy_tokens, "onnxruntime_prefill_s": round(prefill_s, 3)}


def parity_tokens(tokenizer, n: int, data_root: str | None = None) -> torch.Tensor:
    """Real text for the parity run: the start of WikiText-2's first article."""
    from maskpro.data import wikitext2_text

    text = wikitext2_text(data_root).strip()[:20 * n]
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:n]
    if ids.numel() < n:
        raise MaskproError(f"the parity text has only {ids.numel()} tokens, {n} needed; lower parity tokens")
    return ids


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors") if f.name != "masks.safetensors")


def export_onnx(src: str | os.PathLike, out: str | os.PathLike, cfg: OnnxExportConfig | None = None,
                check: CheckReport | None = None) -> dict:
    """Check ``src`` (a maskpro model folder), export it to ``out/model.onnx``, check and compare it.

    Refuses a broken pattern before doing anything. Returns the report also written to
    ``out/export-report.json``; ``out`` appears only when everything succeeded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = cfg or OnnxExportConfig()
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise MaskproError(f"--out {out} is the source folder; choose a new folder for the export")
    t_start = time.perf_counter()
    check = check or check_folder(src)
    check.raise_if_bad()
    dtype = parse_dtype(cfg.dtype)
    # Eager attention keeps every dtype explicit in the graph (SDPA traces to fp32 casts of o_proj in fp16).
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    report: dict = {"engine": "onnx", "source": str(src), "dtype": cfg.dtype, "opset": cfg.opset,
                    "external_data": DATA_FILE, "config": asdict(cfg),
                    "source_check": {"ok": check.ok, "layers": len(check.targeted), "nm": str(check.nm)}}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        t0 = time.perf_counter()
        export_graph(model, tmp / ONNX_FILE, cfg.opset)
        report["export_s"] = round(time.perf_counter() - t0, 2)
        for name in _COPIED:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        onnx_check = check_onnx(tmp / ONNX_FILE, check.nm, {l.name for l in check.targeted})
        onnx_check.raise_if_bad()
        if len(onnx_check.targeted) != len(check.targeted):
            raise MaskproError(f"the ONNX graph has {len(onnx_check.targeted)} sparse MatMul weights where the "
                               f"model has {len(check.targeted)}; the exporter renamed or fused layers")
        report["onnx_check"] = {"ok": onnx_check.ok, "layers": len(onnx_check.targeted),
                                "dense_layers": [l.name for l in onnx_check.layers if not l.targeted]}
        if cfg.parity:
            ids = parity_tokens(tokenizer, cfg.parity_prompt_tokens, cfg.data_root)
            ref, config = torch_reference(model, ids, cfg.parity_new_tokens), model.config
            del model  # free the PyTorch weights before ONNX Runtime loads its own copy
            gc.collect()
            report["parity"] = {**parity(tmp / ONNX_FILE, ref, config, dtype), "text": "WikiText-2 test, first article"}
        report["onnx_bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.name.startswith(ONNX_FILE))
        report["source_weight_bytes"] = _weights_bytes(src)
        report["peak_rss_bytes"] = _peak_rss_bytes()
        report["total_s"] = round(time.perf_counter() - t_start, 2)
        save_json(report, tmp / REPORT_FILE)
        seal(tmp, {**read_metadata(src), "export": {"format": "onnx", "dtype": cfg.dtype, "opset": cfg.opset}})
    log.info("exported %s -> %s in %.1f s", src, out / ONNX_FILE, report["total_s"])
    return report


def read_report(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / REPORT_FILE).read_text())
