"""Damaged files are found before anything loads them, and named in one line with what to do.

A safetensors file states in its header where every tensor ends, so a truncated or overwritten file shows
as a size that disagrees with its header, or a header that does not parse; a JSON file either parses or not.
Header checks read headers only. Beyond them, every folder maskpro writes records the size and sha256 of each
of its files in its metadata (``"files"`` in maskpro.json, or in an export's report), and every reader
verifies them before loading: a bit flipped inside a tensor, or a file swapped for another, is caught too.
A command often opens one folder several times (check, then export, then reload); a file's hash is kept per
process for as long as its size and modification time stay the same, so it is read once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import MaskproError

MAX_HEADER_BYTES = 100 * 2**20   # safetensors' own limit for a header
DIGEST_KEY = "files"


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


def check_headers(folder: str | os.PathLike) -> None:
    """Check that every JSON file of a model folder parses and every safetensors header is whole: all a folder
    without a record of its files can be checked by, and cheap enough to run before any file is hashed."""
    folder = Path(folder)
    for f in sorted(folder.glob("*.json")):
        read_json(f)
    for f in sorted(folder.glob("*.safetensors")):
        check_safetensors(f)


_HASHED: dict[tuple, str] = {}  # (path, inode, size, mtime) -> sha256, for this process


def sha256(path: Path, chunk: int = 16 * 2**20) -> str:
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
        _HASHED[key] = h.hexdigest()
    return _HASHED[key]


def digest_files(folder: str | os.PathLike, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """``{relative path: {"bytes": size, "sha256": hex}}`` of every file under ``folder`` except ``skip``
    (the metadata file that will hold this record)."""
    folder = Path(folder)
    return {f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "sha256": sha256(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.relative_to(folder).as_posix() not in skip}


def verify_files(folder: str | os.PathLike, files: dict, record: str) -> None:
    """Every file ``files`` (a :func:`digest_files` record kept in ``record``) lists is present, whole and
    unchanged; else one line naming the first that is not."""
    folder = Path(folder)
    if not isinstance(files, dict):
        raise damaged(folder / record, f"its {DIGEST_KEY!r} record is not a mapping")
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise MaskproError(f"{path} is missing (listed in {record}); copy the whole folder again, or re-create "
                               "it by re-running the command that wrote it")
        size = path.stat().st_size
        if size != want.get("bytes"):
            raise damaged(path, f"{size} bytes where {record} records {want.get('bytes')}: truncated or replaced")
        if sha256(path) != want.get("sha256"):
            raise MaskproError(f"{path} is not the file {record} records (its sha256 differs): re-create it by "
                               f"re-running the command that wrote it, or, if you changed it on purpose, delete "
                               f"the {DIGEST_KEY!r} entry of {record}")


def verify_recorded(folder: str | os.PathLike, record: str) -> bool:
    """Verify the files listed in ``folder/record``'s ``"files"``; False when the folder keeps no record (a
    folder written before records existed, or not by maskpro)."""
    path = Path(folder) / record
    if not path.is_file():
        return False
    meta = read_json(path)
    if not isinstance(meta, dict) or DIGEST_KEY not in meta:
        return False
    verify_files(folder, meta[DIGEST_KEY], record)
    return True
