"""How the embedded torch engine loads its model and schedules requests."""

from __future__ import annotations

from dataclasses import dataclass

from maskpro.errors import MaskproError

__all__ = ["EngineConfig", "KV_CACHES", "RUNTIMES", "STATIC_CACHE_SHARE"]

KV_CACHES = ("auto", "static", "dynamic")
RUNTIMES = ("auto", "fast", "transformers")
STATIC_CACHE_SHARE = 0.5   # "auto" falls back to the dynamic cache when slots would need more of the free memory


@dataclass
class EngineConfig:
    """How the torch backend loads and schedules; the limits are what clients see as 400/429/504.

    A config checks itself when built (:meth:`validate`), so a bad option fails before any model is read.
    """

    model: str
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                # auto (fp32 on CPU, bf16/fp16 on CUDA) | fp32 | fp16 | bf16
    sparse: bool = True                # swap linears for the 2:4 runtime (maskpro.serve.sparse_linear)
    max_batch_size: int = 32           # rows in the running decode batch
    max_queue: int = 128               # requests waiting for a batch slot before 429
    max_prompt_tokens: int | None = None  # None: the model's context minus one
    max_new_tokens: int = 1024         # the largest max_tokens a request may ask for
    default_max_tokens: int = 16       # /v1/completions without max_tokens (OpenAI's default)
    request_timeout_s: float = 300.0   # queue wait + generation, then 504
    prefill_tokens: int = 8192         # padded tokens one prefill group may hold (bounds a step's latency)
    kv_cache: str = "auto"             # auto (static slots on CUDA, else dynamic) | static | dynamic
    cuda_graphs: bool = True           # static cache on CUDA: replay decode steps from CUDA graphs
    runtime: str = "auto"              # auto (fast for Llama-family models on CUDA) | fast | transformers
    threads: int | None = None         # torch intra-op threads on CPU; None leaves torch's setting alone
    served_model_name: str | None = None  # the id clients pass as "model"; default: the folder name

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`MaskproError` for an out-of-range limit or an unknown choice. Fields may be changed
        after construction, so the engine checks again before it loads."""
        for name in ("max_batch_size", "max_queue", "max_new_tokens", "default_max_tokens", "prefill_tokens"):
            if int(getattr(self, name)) < 1:
                raise MaskproError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache not in KV_CACHES:
            raise MaskproError(f"unknown kv_cache {self.kv_cache!r}; choose one of {', '.join(KV_CACHES)}")
        if self.runtime not in RUNTIMES:
            raise MaskproError(f"unknown runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if self.runtime == "fast" and self.kv_cache == "dynamic":
            raise MaskproError("runtime 'fast' decodes over the static slot cache; drop kv_cache=dynamic")
        if self.threads is not None and self.threads < 1:
            raise MaskproError(f"threads must be >= 1, got {self.threads}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise MaskproError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if not self.request_timeout_s > 0:
            raise MaskproError(f"request timeout must be > 0 seconds, got {self.request_timeout_s}")
