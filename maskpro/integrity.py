"""Damaged files are found before anything loads them, and named in one line with what to do.

A safetensors file states in its header where every tensor ends, so a truncated or overwritten file shows
as a size that disagrees with its header, or a header that does not parse; a JSON file either parses or not.
These checks read headers only (not the tensors), so every command can afford them on every folder it opens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import MaskproError

MAX_HEADER_BYTES = 100 * 2**20   # safetensors' own limit for a header
JSON_FILES = ("config.json", "maskpro.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
              "special_tokens_map.json", "model.safetensors.index.json")


def damaged(path: Path, what: str) -> MaskproError:
    return MaskproError(f"{path} is damaged ({what}); re-create it by re-running the command that wrote it "
                        f"(maskpro prune, maskpro-export), or copy it again")


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise a one-line :class:`MaskproError` if ``path`` is not a whole safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise damaged(path, f"{size} bytes, shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise damaged(path, "its header length is impossible: not a safetensors file, or overwritten")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise damaged(path, "its header is not valid JSON") from None
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, AttributeError):
        raise damaged(path, "its header lists no tensor offsets") from None
    if 8 + n + end != size:
        raise damaged(path, f"its header promises {8 + n + end} bytes, the file has {size}: truncated or padded")


def read_json(path: str | os.PathLike):
    """The parsed JSON file at ``path``, or a one-line :class:`MaskproError` naming it if it does not parse."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise damaged(path, f"not valid JSON: {str(e).splitlines()[0]}") from None


def check_folder_files(folder: str | os.PathLike) -> None:
    """Check every safetensors file and the JSON files a model folder is read through."""
    folder = Path(folder)
    for f in sorted(folder.glob("*.safetensors")):
        check_safetensors(f)
    for name in JSON_FILES:
        if (folder / name).is_file():
            read_json(folder / name)
