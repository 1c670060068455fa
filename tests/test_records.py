"""Preference record files: every bad record is reported by file, line and field; writes are atomic."""
import json

import pytest

from logo.data import InvalidPreferenceFile, PreferenceRecord, read_preference_file, write_preference_file

GOOD = {"id": "a", "context": "long text", "question": "q?", "chosen": "yes", "rejected": ["no", "maybe"]}


def write_lines(tmp_path, lines):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return str(path)


def test_reads_valid_records(tmp_path):
    path = write_lines(tmp_path, [GOOD, "", {**GOOD, "id": 7, "context": ["c1", "c2"], "system": "s"}])
    records = read_preference_file(path, num_negatives=2)
    assert records[0] == PreferenceRecord("a", ("long text",), "q?", "yes", ("no", "maybe"))
    assert records[1].id == "7" and records[1].context == ("c1", "c2") and records[1].system == "s"


def test_reports_every_bad_record_with_file_line_and_field(tmp_path):
    bad = [
        GOOD,
        {k: v for k, v in GOOD.items() if k != "question"} | {"id": "b"},  # line 2: missing field
        {**GOOD, "id": "c", "chosen": "  "},  # line 3: empty response
        {**GOOD, "id": "d", "rejected": "no"},  # line 4: wrong type
        {**GOOD, "id": "e", "rejected": ["no"]},  # line 5: fewer rejected than M
        "{not json",  # line 6
        {**GOOD, "id": "f", "context": []},  # line 7
        {**GOOD, "id": "a"},  # line 8: duplicate id
        {**GOOD, "id": "g", "rejected": ["no", ""]},  # line 9: empty rejected response
        [1, 2],  # line 10: not an object
    ]
    path = write_lines(tmp_path, bad)
    with pytest.raises(InvalidPreferenceFile) as info:
        read_preference_file(path, num_negatives=2)
    errors = info.value.errors
    expected = [
        f"{path}:2: question: missing",
        f"{path}:3: chosen: must be a non-empty string (empty response)",
        f"{path}:4: rejected: must be a list of strings, got str",
        f"{path}:5: rejected: has 1 responses, fewer than num_negatives = 2",
        f"{path}:6: record: not valid JSON",
        f"{path}:7: context: a list of chunks must be non-empty",
        f"{path}:8: id: duplicate of line 1 ('a')",
        f"{path}:9: rejected[1]: must be a non-empty string (empty response)",
        f"{path}:10: record: must be a JSON object, got list",
    ]
    assert len(errors) == len(expected), errors
    for error, start in zip(errors, expected):
        assert error.startswith(start), (error, start)
    assert "refusing to use the file" in str(info.value)


def test_empty_file_is_refused(tmp_path):
    with pytest.raises(InvalidPreferenceFile, match="no records"):
        read_preference_file(write_lines(tmp_path, [""]))


def test_write_is_atomic_and_round_trips(tmp_path):
    path = str(tmp_path / "out" / "prefs.jsonl")
    records = [PreferenceRecord("a", ("c",), "q", "yes", ("no", "maybe")),
               PreferenceRecord("b", ("c1", "c2"), "q", "yes", ("no", "x"), system="sys")]
    assert write_preference_file(records, path) == 2
    assert read_preference_file(path) == records

    def failing():
        yield records[0]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_preference_file(failing(), path)
    assert read_preference_file(path) == records, "an interrupted write must leave the old file intact"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["prefs.jsonl"], "no temp file left behind"


def test_written_file_loads_with_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = str(tmp_path / "prefs.jsonl")
    write_preference_file([PreferenceRecord("a", ("c",), "q", "yes", ("no", "maybe")),
                           PreferenceRecord("b", ("c1", "c2"), "q", "ok", ("n1", "n2"))], path)
    ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 2 and ds[1]["context"] == ["c1", "c2"] and ds[0]["rejected"] == ["no", "maybe"]
