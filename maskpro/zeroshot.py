"""Zero-shot multiple-choice accuracy (lm-evaluation-harness conventions) from local data files.

Pruning papers (SparseGPT, Wanda, MaskPro) report lm-eval-harness zero-shot accuracy on seven tasks, so
prompts, scoring and metrics follow lm-eval 0.4: every choice is a ``(context, continuation)`` request
scored by the summed log-probability of the continuation tokens; ``acc`` takes the argmax of those and
``acc_norm`` the argmax after dividing by the character length of the choice text (lm-eval's
``acc_norm``: the choice without the leading " " target delimiter).

Files are read from the data directory (``maskpro.data.data_dir``); no network, no ``datasets``. Where
the local copy differs from lm-eval's source dataset it is adapted as follows:

- piqa: official dev set (``valid.jsonl`` + ``valid-labels.lst``), the same 1838 rows lm-eval uses.
- arc_easy: the LLM-Adapters prompt format ("Please choose the correct answer to the question: Q\\n\\n
  Answer1: a Answer2: b ...", gold "answerN"). Question and choices are parsed back out of it; text
  the conversion changed (e.g. whitespace) cannot be recovered.
- arc_challenge: question / options / answer label, as in ``allenai/ai2_arc``.
- boolq: llm-foundry's ``"Passage: P\\nQuestion: Q?"``; dropping "Passage: " and appending
  ``"\\nAnswer:"`` gives lm-eval's ``"P\\nQuestion: Q?\\nAnswer:"`` exactly; choices " no", " yes".
- openbookqa: llm-foundry's ``query`` is the question stem, as lm-eval's ``doc_to_text``.
- hellaswag: original schema, lm-eval's ``preprocess``; only a 1000-example subset of the 10042 val rows
  is available, so numbers are not directly comparable with full-set results.
- winogrande: llm-foundry stores the partial-evaluation split already: ``context_options`` is the
  sentence up to the blank with each option filled in, ``continuation`` the (stripped) rest. Scored
  as lm-eval does: continuation " " + rest given each context; only ``acc`` (``acc_norm`` = ``acc``).

Tokenization follows lm-eval's ``_encode_pair``: trailing context spaces move to the continuation,
context and context+continuation are encoded and the continuation tokens are the tail past the context
tokens; inputs longer than the model's context are left-truncated. Unlike lm-eval's HF backend (which
adds no special tokens unless ``add_bos_token``), the tokenizer's own default decides about a BOS token.
Log-softmax is taken in float32 over continuation positions only, and requests whose model input is
identical (e.g. boolq's one-token " no"/" yes") share one forward pass, like lm-eval's logits cache.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import data_dir, data_file
from .errors import MaskproError

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "openbookqa", "hellaswag")

# Tasks lm-eval reports only ``acc`` for (partial evaluation: the contexts differ, not the continuations).
_ACC_ONLY = frozenset({"winogrande"})

Root = str | os.PathLike | None


@dataclass
class Example:
    """One multiple-choice item as scoring requests: choice i is ``(contexts[i], continuations[i])``."""

    contexts: list[str]  # one per choice (all equal except winogrande)
    continuations: list[str]  # one per choice
    gold: int

    def __post_init__(self) -> None:
        # Catch malformed data here, where the row is known, rather than as a wrong accuracy later.
        if len(self.contexts) != len(self.continuations) or len(self.contexts) < 2:
            raise MaskproError(f"malformed example: {len(self.contexts)} contexts for "
                               f"{len(self.continuations)} continuations; check the task's data file")
        if not 0 <= self.gold < len(self.continuations):
            raise MaskproError(f"malformed example: gold index {self.gold} for {len(self.continuations)} "
                               "choices; check the task's data file")


def _choices(context: str, choices: Sequence[str], gold: int) -> Example:
    """The common case: one shared context, each choice after lm-eval's " " target delimiter."""
    return Example([context] * len(choices), [" " + c for c in choices], int(gold))


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _piqa(root: Root) -> list[Example]:
    rows = _jsonl(data_file("piqa/valid.jsonl", root))
    labels = data_file("piqa/valid-labels.lst", root).read_text(encoding="utf-8").split()
    if len(labels) != len(rows):
        raise MaskproError(f"piqa has {len(rows)} questions but {len(labels)} labels; "
                           "valid.jsonl and valid-labels.lst must come from the same release")
    return [_choices(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(g))
            for r, g in zip(rows, labels)]


_ARC_PROMPT = "Please choose the correct answer to the question: "


def _parse_arc_prompt(instruction: str) -> tuple[str, list[str]]:
    """Split LLM-Adapters' ``Q\\n\\nAnswer1: a Answer2: b ...\\n\\nAnswer format: answer1/...`` back up."""
    body, sep, fmt = instruction.rpartition("\n\nAnswer format: ")
    question, sep1, rest = body.removeprefix(_ARC_PROMPT).partition("\n\nAnswer1: ")
    if not (sep and sep1):
        raise MaskproError(f"arc_easy row is not in the Answer1..AnswerK prompt format: {instruction[:80]!r}")
    choices = []
    for k in range(2, fmt.count("/") + 2):
        choice, sep, rest = rest.partition(f" Answer{k}: ")
        if not sep:
            raise MaskproError(f"arc_easy row lacks Answer{k}: {instruction[:80]!r}")
        choices.append(choice)
    return question, choices + [rest]


def _arc_easy(root: Root) -> list[Example]:
    rows = json.loads(data_file("arc_easy/test.json", root).read_text(encoding="utf-8"))
    out = []
    for r in rows:
        question, choices = _parse_arc_prompt(r["instruction"])
        out.append(_choices(f"Question: {question}\nAnswer:", choices, int(r["answer"].removeprefix("answer")) - 1))
    return out


def _arc_challenge(root: Root) -> list[Example]:
    out = []
    for r in _jsonl(data_file("arc_challenge/arc_challenge_test.jsonl", root)):
        labels = [o["label"] for o in r["options"]]
        out.append(_choices(f"Question: {r['question']}\nAnswer:", [o["text"] for o in r["options"]],
                            labels.index(r["answer"])))
    return out


def _winogrande(root: Root) -> list[Example]:
    return [Example(list(r["context_options"]), [" " + r["continuation"].strip()] * len(r["context_options"]),
                    int(r["gold"]))
            for r in _jsonl(data_file("winogrande/winogrande.jsonl", root))]


def _boolq(root: Root) -> list[Example]:
    return [_choices(r["query"].removeprefix("Passage: ") + "\nAnswer:", r["choices"], r["gold"])
            for r in _jsonl(data_file("boolq/boolq.jsonl", root))]


def _openbookqa(root: Root) -> list[Example]:
    return [_choices(r["query"], r["choices"], r["gold"])
            for r in _jsonl(data_file("openbookqa/openbook_qa.jsonl", root))]


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's clean-up of WikiHow artefacts ("[title]", "[step]" tags) in HellaSwag text."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(root: Root) -> list[Example]:
    out = []
    for r in _jsonl(data_file("hellaswag/hellaswag.jsonl", root)):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        out.append(_choices(_hellaswag_preprocess(r["activity_label"] + ": " + ctx),
                            [_hellaswag_preprocess(e) for e in r["endings"]], int(r["label"])))
    return out


_LOADERS: dict[str, Callable[[Root], list[Example]]] = {
    "piqa": _piqa, "arc_easy": _arc_easy, "arc_challenge": _arc_challenge, "winogrande": _winogrande,
    "boolq": _boolq, "openbookqa": _openbookqa, "hellaswag": _hellaswag,
}


def _check_task(name: str) -> None:
    if name not in _LOADERS:
        raise MaskproError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")


def load_task(name: str, root: Root = None, limit: int | None = None) -> list[Example]:
    """The examples of one task in file order; ``limit`` keeps the first ``limit`` (deterministic subsets)."""
    _check_task(name)
    if limit is not None and limit < 1:
        raise MaskproError(f"limit must be a positive number of examples, got {limit}")
    data_dir(root)  # a missing directory is reported as such, not as a missing task file
    examples = _LOADERS[name](root)
    return examples[:limit] if limit is not None else examples


# --- scoring -------------------------------------------------------------------------------------------

def _max_length(model, tokenizer) -> int:
    """The model's context length, looked up as lm-eval does (config, then tokenizer, then 2048)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**9:
        return value
    return 2048


def _token_ids(tokenizer, texts: list[str], **kwargs) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, **kwargs)["input_ids"]] if texts else []


def _encode(tokenizer, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per request, as lm-eval's ``_encode_pair`` (see module docstring)."""
    pairs = []
    for context, continuation in requests:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:  # "A: " + "x" tokenizes as "A:" + " x" in BPE vocabularies
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        pairs.append((context, continuation))
    unique = list(dict.fromkeys(c for c, _ in pairs if c))  # choices share contexts: encode each once
    context_ids = dict(zip(unique, _token_ids(tokenizer, unique)))
    whole_ids = _token_ids(tokenizer, [c + x for c, x in pairs if c])
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    out, wholes = [], iter(whole_ids)
    for context, continuation in pairs:
        if context and context_ids[context]:
            ctx = context_ids[context]
            out.append((ctx, next(wholes)[len(ctx):]))
            continue
        if context:
            next(wholes)
        cont = _token_ids(tokenizer, [continuation], add_special_tokens=False)[0]
        if prefix is None:
            raise MaskproError("an empty context needs a BOS or EOS token to condition on; "
                               "the tokenizer has neither")
        # An empty context conditions on BOS/EOS (lm-eval's prefix token).
        out.append(([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:]))
    return out


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 32,
                   progress: bool = False) -> list[float]:
    """log P(continuation | context) for each ``(context, continuation)`` request, in request order.

    Distinct model inputs are run longest first in right-padded batches (sorting keeps padding small);
    logits and log-softmax are computed only at continuation positions, where the vocabulary-sized work is.
    Padding is masked and positions start at 0 in every row, so results match one-at-a-time scoring.
    """
    if batch_size < 1:
        raise MaskproError(f"batch_size must be at least 1, got {batch_size}")
    max_len = _max_length(model, tokenizer)
    inputs: dict[tuple[int, ...], int] = {}  # distinct model input -> slot
    plan: list[tuple[int, list[int]] | None] = []  # per request: (slot, continuation ids); None: empty
    for ctx, cont in _encode(tokenizer, requests):
        if not cont:
            plan.append(None)  # the empty continuation has probability 1
            continue
        if len(cont) > max_len:
            raise MaskproError(f"a continuation of {len(cont)} tokens exceeds the model's context of "
                               f"{max_len} tokens; shorten the choices")
        inp = tuple((ctx + cont)[-(max_len + 1):][:-1])  # lm-eval: left-truncate, last token is only a target
        plan.append((inputs.setdefault(inp, len(inputs)), cont))
    seqs = list(inputs)
    users: list[list[int]] = [[] for _ in seqs]
    for i, p in enumerate(plan):
        if p is not None:
            users[p[0]].append(i)
    order = sorted(range(len(seqs)), key=lambda s: -len(seqs[s]))

    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keep_positions = "logits_to_keep" in inspect.signature(model.forward).parameters
    results = [0.0] * len(requests)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(requests), disable=not progress, desc="loglikelihood",
                                          unit="req") as bar:
            bar.update(sum(p is None for p in plan))
            for start in range(0, len(order), batch_size):
                slots = order[start:start + batch_size]
                ids = torch.full((len(slots), len(seqs[slots[0]])), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                rows, cols, targets, owners, batch_requests = [], [], [], [], []
                for r, s in enumerate(slots):
                    n = len(seqs[s])
                    ids[r, :n] = torch.tensor(seqs[s], dtype=torch.long)
                    mask[r, :n] = 1
                    for i in users[s]:
                        cont = plan[i][1]
                        rows += [r] * len(cont)
                        cols += range(n - len(cont), n)  # logits at t predict token t + 1
                        targets += cont
                        owners += [len(batch_requests)] * len(cont)
                        batch_requests.append(i)
                kwargs = {}
                if keep_positions:  # project only the needed positions onto the vocabulary
                    kept = sorted(set(cols))
                    where = {c: k for k, c in enumerate(kept)}
                    cols = [where[c] for c in cols]
                    kwargs["logits_to_keep"] = torch.tensor(kept, dtype=torch.long, device=device)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                               **kwargs).logits
                picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
                logprobs = picked.float().log_softmax(-1).gather(
                    1, torch.tensor(targets, device=device)[:, None]).squeeze(1)
                sums = torch.zeros(len(batch_requests), dtype=torch.float64, device=device).index_add_(
                    0, torch.tensor(owners, device=device), logprobs.double())
                for i, value in zip(batch_requests, sums.tolist()):
                    results[i] = value
                bar.update(len(batch_requests))
    finally:
        model.train(was_training)
    return results


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first maximum, as numpy.argmax


def _score(examples: Sequence[Example], lls: Sequence[float], acc_only: bool) -> dict:
    """acc / acc_norm over examples given the flat per-choice log-likelihoods."""
    hits = hits_norm = pos = 0
    for ex in examples:
        ll = lls[pos:pos + len(ex.continuations)]
        pos += len(ex.continuations)
        hits += _argmax(ll) == ex.gold
        # lm-eval normalizes by the choice's character length, without the " " target delimiter.
        lengths = [max(len(c.removeprefix(" ")), 1) for c in ex.continuations]
        hits_norm += _argmax([v / n for v, n in zip(ll, lengths)]) == ex.gold
    n = len(examples)
    acc = hits / n if n else math.nan
    return {"acc": acc, "acc_norm": acc if acc_only else (hits_norm / n if n else math.nan), "n": n}


def evaluate_zeroshot(model, tokenizer, tasks: str | Iterable[str] | None = None, root: Root = None,
                      limit: int | None = None, batch_size: int = 32, progress: bool = True) -> dict:
    """Zero-shot accuracy per task plus the unweighted task average (how pruning papers report it).

    Returns ``{task: {"acc", "acc_norm", "n"}, ..., "average": {"acc", "acc_norm"}}``. All tasks are
    loaded before any is scored, so a missing file fails fast rather than after a long run.
    """
    names = list(TASKS) if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise MaskproError(f"no tasks given; choose from {', '.join(TASKS)}")
    for name in names:
        _check_task(name)
    loaded = {name: load_task(name, root, limit) for name in names}
    results: dict[str, dict] = {}
    for name, examples in loaded.items():
        requests = [pair for ex in examples for pair in zip(ex.contexts, ex.continuations)]
        log.info("%s: scoring %d examples (%d requests)", name, len(examples), len(requests))
        lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress)
        results[name] = _score(examples, lls, acc_only=name in _ACC_ONLY)
        log.info("%s: acc %.4f acc_norm %.4f (n=%d)", name, results[name]["acc"], results[name]["acc_norm"],
                 results[name]["n"])
    results["average"] = {key: sum(results[t][key] for t in loaded) / len(loaded) for key in ("acc", "acc_norm")}
    return results
