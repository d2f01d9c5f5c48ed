"""Reading documents: .txt (paragraph, line, file), .jsonl, .csv and .parquet with data.text_field, globs."""

import json

import pytest

from engine import data as data_mod
from engine.errors import UserError
from engine.recipe import DataSection

DOCS = ["The boat left the harbour.", "Anna sold bread, apples and honey.", "A cold wind came from the sea."]


def read(path, **keys):
    return data_mod.load_documents(str(path), "data.train", DataSection(train=str(path), **keys))[0]


def test_txt_documents_are_paragraphs_lines_or_the_whole_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First line\nsecond line\n\nSecond paragraph\n\n\nThird\n", encoding="utf-8")
    assert [d.strip() for d in read(path)] == ["First line\nsecond line", "Second paragraph", "Third"]
    assert read(path, txt_documents="line") == ["First line", "second line", "Second paragraph", "Third"]
    (whole,) = read(path, txt_documents="file")
    assert "First line" in whole and "Third" in whole


def test_jsonl_csv_and_parquet_use_the_text_field(tmp_path):
    import datasets

    rows = [{"id": i, "body": d} for i, d in enumerate(DOCS)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        assert read(tmp_path / name, text_field="body") == DOCS, name
    with pytest.raises(UserError, match=r"has no column 'text' \(columns: id, body\); set data.text_field"):
        read(tmp_path / "d.jsonl")


def test_glob_and_folder_read_every_matching_file_in_order(tmp_path):
    for i, d in enumerate(DOCS):
        (tmp_path / f"part{i}.txt").write_text(d + "\n", encoding="utf-8")
    assert [d.strip() for d in read(tmp_path / "part*.txt")] == DOCS
    assert [d.strip() for d in read(tmp_path)] == DOCS  # a folder: every supported file in it


def test_a_datasets_name_that_cannot_be_loaded_is_one_error_naming_the_key(monkeypatch):
    """A data.train that is no file, glob or folder is tried as a datasets name; its failure is a UserError
    naming the key, for plain documents (data.load_documents) and for rows of any format (formats.load_rows)."""
    import datasets

    from engine import data as data_mod
    from engine import formats
    from engine.recipe import DataSection

    def refuse(name, split):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    expected = r"data.train: 'no_such_set' is not a file, glob or folder, and loading it as a dataset failed \(FileNotFoundError: Dataset 'no_such_set'"
    with pytest.raises(UserError, match=expected):
        data_mod.load_documents("no_such_set", "data.train", DataSection(train="x"))
    with pytest.raises(UserError, match=expected):
        formats.load_rows("no_such_set", "data.train", DataSection(train="x"))
