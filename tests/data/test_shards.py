from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from moeut.data import ShardError, ShardWriter, TokenDataset, TokenizerMismatchError, token_dtype

SHA = "ab" * 32


def write_split(directory, docs, *, vocab_size=1000, eos_id=2, shard_tokens=7, split="train"):
    with ShardWriter(directory, split, vocab_size=vocab_size, eos_id=eos_id, tokenizer_sha256=SHA,
                     shard_tokens=shard_tokens, buffer_tokens=5) as w:
        for d in docs:
            w.add_document(d)
    return TokenDataset.open(directory)


def expected_stream(docs, eos_id=2):
    return np.concatenate([np.append(np.asarray(d, dtype=np.int64), eos_id) for d in docs])


DOCS = [[10, 11, 12], [], [20, 21, 22, 23, 24, 25, 26, 27, 28], [30], [40, 41, 42, 43]]


def test_token_dtype():
    assert token_dtype(8000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(200_000) == np.uint32


def test_writer_layout_and_metadata(tmp_path):
    ds = write_split(tmp_path / "train", DOCS)
    stream = expected_stream(DOCS)
    meta = json.loads((tmp_path / "train" / "meta.json").read_text())
    assert meta["format"] == "moeut-tokens" and meta["format_version"] == 1 and meta["split"] == "train"
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 1000 and meta["eos_id"] == 2
    assert meta["tokenizer_sha256"] == SHA
    assert meta["num_tokens"] == len(stream) == 22 and meta["num_documents"] == 5
    assert [s["num_tokens"] for s in meta["shards"]] == [7, 7, 7, 1]
    assert [s["file"] for s in meta["shards"]] == [f"train-{k:05d}.bin" for k in range(4)]
    raw = np.concatenate([np.memmap(tmp_path / "train" / s["file"], dtype=meta["dtype"], mode="r")
                          for s in meta["shards"]])
    assert (raw == stream).all()
    assert not list((tmp_path / "train").glob("*.tmp"))
    assert len(ds) == 22 and ds.num_documents == 5


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    docs = [[70_000, 65_536, 5], [99_999]]
    ds = write_split(tmp_path / "big", docs, vocab_size=100_000, eos_id=99_998)
    assert ds.meta.dtype == "uint32"
    assert (tmp_path / "big" / "train-00000.bin").stat().st_size == 6 * 4
    assert ds.window(0, len(ds)).tolist() == [70_000, 65_536, 5, 99_998, 99_999, 99_998]


def test_writer_rejects_out_of_range_ids(tmp_path):
    w = ShardWriter(tmp_path, "train", vocab_size=100, eos_id=2, tokenizer_sha256=SHA)
    with pytest.raises(ValueError, match="out of range"):
        w.add_document([5, 100])


def test_windows_cross_shard_boundaries(tmp_path):
    ds = write_split(tmp_path / "train", DOCS)
    stream = expected_stream(DOCS)
    for start in range(len(stream)):
        for length in range(len(stream) - start + 1):
            assert (ds.window(start, length) == stream[start:start + length]).all()
    assert (ds[3:15] == stream[3:15]).all() and ds[-1] == 2
    with pytest.raises(IndexError):
        ds.window(20, 5)


def test_open_by_meta_file_or_parent_with_split(tmp_path):
    write_split(tmp_path / "val", DOCS, split="val")
    assert TokenDataset.open(tmp_path / "val" / "meta.json").num_tokens == 22
    assert TokenDataset.open(tmp_path, split="val").meta.split == "val"
    with pytest.raises(ShardError, match="does not exist"):
        TokenDataset.open(tmp_path, split="train")
    with pytest.raises(ShardError, match="not 'train'"):
        TokenDataset.open(tmp_path / "val", split="train")


def test_truncated_shard_names_file_and_fix(tmp_path):
    write_split(tmp_path / "train", DOCS)
    shard = tmp_path / "train" / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ShardError) as e:
        TokenDataset.open(tmp_path / "train")
    assert str(shard) in str(e.value) and "truncated" in str(e.value) and "re-run `moeut prepare`" in str(e.value)


def test_missing_shard_and_corrupt_meta(tmp_path):
    write_split(tmp_path / "train", DOCS)
    (tmp_path / "train" / "train-00003.bin").unlink()
    with pytest.raises(ShardError, match=r"train-00003\.bin is missing"):
        TokenDataset.open(tmp_path / "train")
    (tmp_path / "train" / "meta.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"meta\.json is unreadable.*re-run"):
        TokenDataset.open(tmp_path / "train")


def test_checksums_catch_same_size_corruption(tmp_path):
    write_split(tmp_path / "train", DOCS)
    shard = tmp_path / "train" / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    TokenDataset.open(tmp_path / "train")  # sizes still match
    with pytest.raises(ShardError, match="sha256"):
        TokenDataset.open(tmp_path / "train", verify_checksums=True)


def test_tokenizer_hash_mismatch_names_both(tmp_path):
    write_split(tmp_path / "train", DOCS)
    TokenDataset.open(tmp_path / "train", expected_tokenizer_sha256=SHA)
    other = "cd" * 32
    with pytest.raises(TokenizerMismatchError) as e:
        TokenDataset.open(tmp_path / "train", expected_tokenizer_sha256=other)
    assert SHA in str(e.value) and other in str(e.value)


def test_pickle_does_not_copy_data(tmp_path):
    ds = write_split(tmp_path / "train", DOCS)
    ds.window(0, 10)  # maps shards
    blob = pickle.dumps(ds)
    assert len(blob) < 2000
    assert (pickle.loads(blob).window(0, 22) == ds.window(0, 22)).all()
