from __future__ import annotations

import gzip
import json

import pytest

from moeut.data import (DataError, DecodeError, EmptyCorpusError, HFDatasetSource, InputFormatError, MissingInputError,
                        SourceOptions, iter_documents, resolve_inputs)
from moeut.data.sources import clean_document, iter_text_lines


def docs_of(inputs, **options):
    return list(iter_documents(resolve_inputs(inputs, SourceOptions(**options))))


def test_text_file_is_one_document_by_default(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n\n  first para\n\nsecond para\n\n\n", encoding="utf-8")
    assert docs_of([f]) == ["  first para\n\nsecond para"]


@pytest.mark.parametrize("sep, expected", [
    ("blank", ["a1\na2", "b1", "c1"]),
    ("blank:2", ["a1\na2\n\nb1", "c1"]),
    ("line", ["a1", "a2", "b1", "c1"]),
    ("<|endoftext|>", ["a1\na2\n\nb1\n  \n\nc1"]),
])
def test_doc_separators(tmp_path, sep, expected):
    f = tmp_path / "a.txt"
    f.write_text("a1\na2\n\nb1\n  \n\nc1\n", encoding="utf-8")
    assert docs_of([f], doc_separator=sep) == expected


def test_marker_separator_and_crlf_and_bom(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"\xef\xbb\xbfone\r\nstory\r\n<|endoftext|>\r\ntwo\r\n  <|endoftext|>  \r\n\r\n")
    assert docs_of([f], doc_separator="<|endoftext|>") == ["one\nstory", "two"]


def test_bad_separator_is_rejected():
    with pytest.raises(ValueError, match="blank"):
        SourceOptions(doc_separator="blank:0")
    with pytest.raises(ValueError):
        SourceOptions(doc_separator="   ")


def test_clean_document_keeps_indentation():
    assert clean_document("\n \n    code()\n  more  \n\n") == "    code()\n  more"
    assert clean_document(" \n\t\n") == ""


def _jsonl(path, rows, field="text"):
    path.write_text("".join(json.dumps({field: r, "id": i}) + "\n" for i, r in enumerate(rows)), encoding="utf-8")
    return path


def test_jsonl_default_and_custom_field(tmp_path):
    _jsonl(tmp_path / "a.jsonl", ["doc one", "  ", "doc two"])
    assert docs_of([tmp_path / "a.jsonl"]) == ["doc one", "doc two"]
    _jsonl(tmp_path / "b.jsonl", ["content x"], field="body")
    assert docs_of([tmp_path / "b.jsonl"], text_field="body") == ["content x"]
    with pytest.raises(InputFormatError, match=r"b\.jsonl:1: no field 'text'.*--text-field"):
        docs_of([tmp_path / "b.jsonl"])


def test_jsonl_bad_json_names_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(InputFormatError, match=r"bad\.jsonl:2: not valid JSON"):
        docs_of([f])


def test_jsonl_lone_surrogate(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"text": "bad \\ud800 char"}\n', encoding="utf-8")
    with pytest.raises(DecodeError, match="--errors replace"):
        docs_of([f])
    assert docs_of([f], errors="replace") == ["bad \ufffd char"]


def test_parquet_and_gz_variants(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"content": ["parquet one", None, "parquet two"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "p.parquet")
    assert docs_of([tmp_path / "p.parquet"], text_field="content") == ["parquet one", "parquet two"]
    with pytest.raises(InputFormatError, match="no column 'text'.*'content'"):
        docs_of([tmp_path / "p.parquet"])
    (tmp_path / "p.parquet.gz").write_bytes(gzip.compress((tmp_path / "p.parquet").read_bytes()))
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(b"gz text\n\nsecond"))
    (tmp_path / "j.jsonl.gz").write_bytes(gzip.compress(b'{"content": "gz json"}\n'))
    assert docs_of([tmp_path / "p.parquet.gz"], text_field="content") == ["parquet one", "parquet two"]
    assert docs_of([tmp_path / "t.txt.gz"], doc_separator="blank") == ["gz text", "second"]
    assert docs_of([tmp_path / "j.jsonl.gz"], text_field="content") == ["gz json"]


def test_directory_recursive_sorted_hidden_skipped(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "2.txt").write_text("B2")
    (tmp_path / "b" / "1.txt").write_text("B1")
    (tmp_path / "a" / "z.md").write_text("AZ")
    (tmp_path / "a" / ".hidden.txt").write_text("hidden")
    (tmp_path / "a" / "notes.bin").write_bytes(b"\xff")
    (tmp_path / "c.jsonl").write_text('{"text": "C"}\n')
    assert docs_of([tmp_path]) == ["AZ", "B1", "B2", "C"]


def test_missing_path_is_named(tmp_path):
    for spec in [tmp_path / "nope.txt", str(tmp_path / "nope"), "data/nope.jsonl", "./nope", "a/b/c"]:
        with pytest.raises(MissingInputError, match="does not exist") as e:
            resolve_inputs([spec])
        assert str(spec) in str(e.value)


def test_empty_directory_and_no_inputs(tmp_path):
    with pytest.raises(EmptyCorpusError, match="no input files"):
        resolve_inputs([tmp_path])
    with pytest.raises(EmptyCorpusError, match="--input"):
        resolve_inputs([])


def test_json_and_csv_files_point_to_hf_loaders(tmp_path):
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(InputFormatError, match="hf:json"):
        resolve_inputs([tmp_path / "x.json"])


def test_undecodable_bytes_name_file_and_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"caf" + b"\xe9 ok\n" + "naïve".encode())
    with pytest.raises(DecodeError) as e:
        docs_of([f])
    assert e.value.offset == 3 and str(f) in str(e.value) and "byte 3" in str(e.value)
    assert "--errors replace" in str(e.value)
    assert docs_of([f], errors="replace") == ["caf\ufffd ok\nnaïve"]


def test_decode_offset_past_the_first_chunk(tmp_path):
    # a multi-byte character straddling the 1 MiB read boundary is fine; the bad byte is found exactly
    head = b"a" * ((1 << 20) - 1) + "é".encode()  # é's two bytes straddle the chunk boundary
    bad_at = len(head) + 10
    f = tmp_path / "big.txt"
    f.write_bytes(head + b"b" * 10 + b"\xff" + b"tail")
    with pytest.raises(DecodeError) as e:
        list(iter_text_lines(f))
    assert e.value.offset == bad_at
    assert f"byte {bad_at}" in str(e.value)
    g = tmp_path / "good.txt"
    g.write_bytes(head + b"\r" + b"\n" + b"x")
    assert "".join(iter_text_lines(g)) == head.decode() + "\nx"


def test_undecodable_jsonl_and_gz(tmp_path):
    f = tmp_path / "x.jsonl"
    data = b'{"text": "fine"}\n{"text": "bad \xff"}\n'
    f.write_bytes(data)
    with pytest.raises(DecodeError) as e:
        docs_of([f])
    assert e.value.offset == data.index(b"\xff") == 31 and "x.jsonl" in str(e.value)
    assert docs_of([f], errors="replace") == ["fine", "bad \ufffd"]
    g = tmp_path / "y.txt.gz"
    g.write_bytes(gzip.compress(b"abc\x80def"))
    with pytest.raises(DecodeError, match=r"y\.txt\.gz: byte 3 of the decompressed data"):
        docs_of([g])


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    f = tmp_path / "broken.txt.gz"
    f.write_bytes(gzip.compress(b"hello world" * 100)[:30])
    with pytest.raises(InputFormatError, match=r"broken\.txt\.gz"):
        docs_of([f])


def test_hf_spec_parsing():
    s = HFDatasetSource.from_spec("hf:json?data_files=a.jsonl,b.jsonl&split=validation&streaming=1",
                                  text_field="body")
    assert s.path == "json" and s.text_field == "body"
    assert s.load_kwargs == {"split": "validation", "data_files": ["a.jsonl", "b.jsonl"], "streaming": True}
    assert HFDatasetSource.from_spec("wikitext?name=wikitext-2-raw-v1").load_kwargs == \
        {"split": "train", "name": "wikitext-2-raw-v1"}
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        HFDatasetSource.from_spec("x?bogus=1")


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf-cache"


def test_hf_json_loader_with_local_data_files(tmp_path, offline_hf):
    a = _jsonl(tmp_path / "a.jsonl", ["hf one", "hf two"])
    b = _jsonl(tmp_path / "b.jsonl", ["hf three"])
    spec = f"hf:json?data_files={a},{b}&cache_dir={offline_hf}"
    assert docs_of([spec]) == ["hf one", "hf two", "hf three"]
    src = HFDatasetSource("json", data_files=str(a), cache_dir=str(offline_hf))
    assert list(src) == ["hf one", "hf two"] and list(src) == ["hf one", "hf two"]  # two passes
    t = tmp_path / "plain.txt"
    t.write_text("line a\nline b\n")
    assert docs_of([f"hf:text?data_files={t}&cache_dir={offline_hf}"]) == ["line a", "line b"]
    with pytest.raises(InputFormatError, match="no column 'body'"):
        docs_of([spec], text_field="body")


def test_dataset_name_without_datasets_installed(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(MissingInputError) as e:
        resolve_inputs(["some-corpus-name"])
    assert "some-corpus-name does not exist" in str(e.value) and "pip install 'moeut[data]'" in str(e.value)


def test_dataset_load_failure_is_explained(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    (src,) = resolve_inputs(["someone/corpus"])
    assert isinstance(src, HFDatasetSource)
    with pytest.raises(DataError) as e:
        list(src)
    msg = str(e.value)
    assert "'someone/corpus'" in msg and "Couldn't reach" in msg and "not an existing local path" in msg
