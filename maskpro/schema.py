"""``maskpro.json``: what maskpro writes beside a model, as one typed, versioned value with one reader and one writer.

Every folder maskpro writes (a pruned model, and each export of one) carries this file:

  format        "maskpro/v1"; a reader refuses a newer version in one line instead of misreading it
  n, m          the N:M pattern (parsed into :class:`~maskpro.nm.NM` here, nowhere else)
  method        how the mask was made ("magnitude", "sparsegpt", "maskpro@sparsegpt", ...)
  targets       the pruned linear layers, by Hugging Face module name
  shapes        each target's weight shape (the packed masks need it)
  files         size and sha256 of every other file of the folder (:mod:`maskpro.integrity`)
  anything else provenance kept as written: source model, architecture, steps, data, "export", ...

Consumers read it with :func:`read_meta` (or :meth:`SavedMeta.from_dict` for a dict that arrives another way,
such as vLLM's quantization config) and write it with :func:`write_meta`, the last write of any folder.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .checkpoint import save_json
from .errors import MaskproError
from .integrity import DIGEST_KEY, check_headers, digest_files, read_json, verify_files
from .nm import NM

METADATA = "maskpro.json"
FORMAT = "maskpro/v1"
_CORE = ("format", "n", "m", "method", "targets", "shapes", DIGEST_KEY)


@dataclass(frozen=True)
class SavedMeta:
    """The parsed ``maskpro.json``. ``extra`` keeps every other key as written (provenance, export info)."""

    nm: NM
    targets: tuple[str, ...]
    method: str | None = None
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    format: str = FORMAT
    files: Mapping[str, dict] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.format.startswith("maskpro/"):
            raise MaskproError(f"metadata format {self.format!r} is not maskpro's; this is not a maskpro folder")
        if self.format != FORMAT:
            raise MaskproError(f"metadata format {self.format!r} is newer than this maskpro reads ({FORMAT}); "
                               "upgrade maskpro")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise MaskproError("metadata lists no target layer names; prune or export the model again")
        unknown = set(self.shapes) - set(self.targets)
        if unknown:
            raise MaskproError(f"metadata has shapes for layers that are not targets ({sorted(unknown)[0]}, ...); "
                               "prune or export the model again")

    @classmethod
    def from_dict(cls, d: Any, source: str = METADATA) -> "SavedMeta":
        """Parse the JSON object; a one-line :class:`MaskproError` naming ``source`` for anything malformed."""
        if not isinstance(d, Mapping):
            raise MaskproError(f"{source} holds a {type(d).__name__}, not a JSON object; prune or export again")
        try:
            n, m = int(d["n"]), int(d["m"])
        except (KeyError, TypeError, ValueError):
            raise MaskproError(f"{source} has no integer n and m; prune or export the model again") from None
        try:
            nm = NM(n, m)
        except MaskproError as e:
            raise MaskproError(f"{source}: {e}") from None
        targets = d.get("targets")
        if not isinstance(targets, list):
            raise MaskproError(f"{source} has no list of target layer names; prune or export the model again")
        try:
            shapes = {str(k): tuple(int(x) for x in v) for k, v in (d.get("shapes") or {}).items()}
        except (AttributeError, TypeError, ValueError):
            raise MaskproError(f"{source} has malformed shapes; prune or export the model again") from None
        try:
            return cls(nm=nm, targets=tuple(targets), method=d.get("method"), shapes=shapes,
                       format=str(d.get("format", FORMAT)), files=d.get(DIGEST_KEY),
                       extra={k: v for k, v in d.items() if k not in _CORE})
        except MaskproError as e:
            raise MaskproError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        """The JSON layout (the same keys every maskpro version since v1 wrote)."""
        out = {"format": self.format, "n": self.nm.n, "m": self.nm.m, "method": self.method,
               "targets": list(self.targets), "shapes": {k: list(v) for k, v in self.shapes.items()}, **self.extra}
        if self.files is not None:
            out[DIGEST_KEY] = dict(self.files)
        return out

    def with_extra(self, **extra: Any) -> "SavedMeta":
        """A copy with ``extra`` keys added or replaced (an export records itself this way)."""
        return dataclasses.replace(self, extra={**self.extra, **extra})

    def get(self, key: str, default: Any = None) -> Any:
        """An extra key (``source_model``, ``export``, ...)."""
        return self.extra.get(key, default)


def has_meta(folder: str | os.PathLike) -> bool:
    return (Path(folder) / METADATA).is_file()


def read_meta(folder: str | os.PathLike, verify: bool = False) -> SavedMeta:
    """The folder's metadata; with ``verify``, also every file it records is present, whole and unchanged."""
    path = Path(folder) / METADATA
    if not path.is_file():
        raise MaskproError(f"{folder} has no {METADATA}; it is not a maskpro output (run maskpro prune first)")
    meta = SavedMeta.from_dict(read_json(path), str(path))
    if verify and meta.files:
        verify_files(folder, meta.files, METADATA)
    return meta


def verify_recorded(folder: str | os.PathLike) -> bool:
    """Verify the files the folder's metadata records; False when it has no metadata or keeps no record."""
    return has_meta(folder) and read_meta(folder, verify=True).files is not None


def check_folder_files(folder: str | os.PathLike) -> None:
    """Check a model folder's JSON files and safetensors headers, then the sizes and hashes its metadata records
    (a truncated or overwritten file is one line naming it, never a loader's traceback)."""
    check_headers(folder)
    verify_recorded(folder)


def write_meta(folder: str | os.PathLike, meta: SavedMeta | Mapping[str, Any]) -> None:
    """Write ``meta`` as the folder's metadata with the size and sha256 of every other file: the last write of
    any folder maskpro makes, so the record covers everything in it."""
    folder = Path(folder)
    d = meta.to_dict() if isinstance(meta, SavedMeta) else dict(meta)
    SavedMeta.from_dict(d, f"metadata for {folder}")  # never write what the reader would refuse
    save_json({**d, DIGEST_KEY: digest_files(folder, skip=(METADATA,))}, folder / METADATA)
