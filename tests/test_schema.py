"""maskpro.json through its one reader and writer: round trips, versions, and one-line refusals."""

from __future__ import annotations

import json

import pytest

from maskpro.errors import MaskproError
from maskpro.nm import NM
from maskpro.schema import FORMAT, METADATA, SavedMeta, read_meta, write_meta

GOOD = {"format": FORMAT, "n": 2, "m": 4, "method": "magnitude", "targets": ["a.q_proj", "a.k_proj"],
        "shapes": {"a.q_proj": [8, 16], "a.k_proj": [4, 16]}, "source_model": "x", "steps": 3}


def test_round_trip_keeps_the_layout_and_extra_keys(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    write_meta(tmp_path, SavedMeta.from_dict(GOOD))
    meta = read_meta(tmp_path, verify=True)
    assert meta.nm == NM(2, 4) and meta.targets == ("a.q_proj", "a.k_proj") and meta.get("steps") == 3
    assert meta.files == {"model.safetensors": {"bytes": 5, "sha256": meta.files["model.safetensors"]["sha256"]}}
    written = json.loads((tmp_path / METADATA).read_text())
    assert {k: v for k, v in written.items() if k != "files"} == GOOD
    assert meta.with_extra(export={"format": "onnx"}).to_dict()["export"] == {"format": "onnx"}


def test_a_changed_file_fails_verification(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    write_meta(tmp_path, GOOD)
    (tmp_path / "model.safetensors").write_bytes(b"12346")
    with pytest.raises(MaskproError, match="sha256 differs"):
        read_meta(tmp_path, verify=True)


@pytest.mark.parametrize("change,message", [
    ({"format": "maskpro/v9"}, "newer than this maskpro reads"),
    ({"format": "other/v1"}, "is not maskpro's"),
    ({"n": "two"}, "no integer n and m"),
    ({"n": 5}, "invalid sparsity 5:4"),
    ({"targets": "a.q_proj"}, "no list of target layer names"),
    ({"targets": []}, "lists no target layer names"),
    ({"shapes": {"b": [1, 2]}}, "shapes for layers that are not targets"),
    ({"shapes": {"a.q_proj": ["x"]}}, "malformed shapes"),
])
def test_malformed_metadata_is_one_line_naming_the_file(tmp_path, change, message):
    (tmp_path / METADATA).write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(MaskproError, match=message) as e:
        read_meta(tmp_path)
    assert "\n" not in str(e.value) and (METADATA in str(e.value) or "maskpro" in str(e.value))


def test_missing_file_and_non_object(tmp_path):
    with pytest.raises(MaskproError, match="has no maskpro.json"):
        read_meta(tmp_path)
    (tmp_path / METADATA).write_text("[1, 2]")
    with pytest.raises(MaskproError, match="not a JSON object"):
        read_meta(tmp_path)


def test_older_files_without_a_format_read_as_v1():
    assert SavedMeta.from_dict({k: v for k, v in GOOD.items() if k != "format"}).format == FORMAT


def test_writer_refuses_what_the_reader_would(tmp_path):
    with pytest.raises(MaskproError, match="no integer n and m"):
        write_meta(tmp_path, {"targets": ["a"]})
    assert not (tmp_path / METADATA).exists()
