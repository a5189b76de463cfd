"""The paper's released SentencePiece tokenizers (nmt_nfkc normalisation, whitespace collapsing, no byte
fallback; fixture A's tokenizer is one) in moeut's tokenizer and in the exported ``tokenizer.json``."""

from __future__ import annotations

import json

import pytest

from moeut.data import Tokenizer
from tests.conftest import shared_file
from tests.integrations.conftest import need_hf

SPM = "fixtures/paper_checkpoint_a/cache/C4/C4-en-512/tokenizer.model.model"
TEXTS = ["data/jane_austen/persuasion.txt", "data/wikitext2/valid.txt", "data/exllamav2_cal/c4.utf8",
         "data/exllamav2_cal/code.utf8", "data/exllamav2_cal/multilingual.utf8",
         "data/exllamav2_cal/technical.utf8", "data/tiny_shakespeare/input.txt"]


@pytest.fixture(scope="module")
def documents() -> list[str]:
    docs = []
    for rel in TEXTS:
        docs += [d for d in shared_file(rel).read_text(encoding="utf-8", errors="replace").split("\n\n") if d]
    assert sum(len(d.encode()) for d in docs) > 3_500_000
    return docs


def test_the_release_tokenizer_normalises_like_sentencepiece_defaults():
    need_hf()
    from moeut.integrations.hf.tokenizer import _model_proto

    proto = _model_proto(shared_file(SPM))
    norm = proto.normalizer_spec
    assert (norm.name, norm.remove_extra_whitespaces, norm.add_dummy_prefix) == ("nmt_nfkc", True, True)
    assert norm.precompiled_charsmap and not proto.trainer_spec.byte_fallback


def test_moeut_tokenizer_reads_the_release_model():
    tok = Tokenizer.load(shared_file(SPM))
    check = json.loads(shared_file("fixtures/paper_checkpoint_a/config.json").read_text())["tokenizer"]
    assert tok.encode(check["check_text"]) == check["check_ids"]
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, -1, 512)
    assert len(tok.sha256) == 64
    # lossy, as SentencePiece is with this model: whitespace collapsed, unknown characters decode as " ⁇ "
    assert tok.decode(tok.encode("  two   spaces\tand a tab ")) == "two spaces and a tab"
    assert tok.decode(tok.encode("naïve")) == tok._sp.decode(tok.encode("naïve"))
    assert tok.decode([tok.eos_id, *tok.encode("end"), tok.bos_id]) == "end"


def test_exported_tokenizer_json_gives_sentencepiece_ids_on_megabytes_of_text(tmp_path, documents):
    need_hf()
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from moeut.integrations.hf.tokenizer import check_round_trip, write_tokenizer_files

    write_tokenizer_files(shared_file(SPM), tmp_path, model_max_length=1 << 30)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    sp = spm.SentencePieceProcessor(model_file=str(shared_file(SPM)))
    want = sp.encode(documents)
    got = hf(documents)["input_ids"]
    bad = [i for i, (a, b) in enumerate(zip(want, got)) if a != b]
    assert not bad, f"{len(bad)} of {len(documents)} documents differ, e.g. {documents[bad[0]][:120]!r}"
    sample = want[::25]
    assert hf.batch_decode(sample) == [sp.decode(ids) for ids in sample]
    assert not check_round_trip(shared_file(SPM), lambda t: hf(t)["input_ids"], hf.decode)
