"""Each loader on small files in the published formats, and on the real files in ../shared/data."""

from __future__ import annotations

import json

import pytest

from moeut.eval.examples import (TaskFormatError, cbt_detokenize, hellaswag_preprocess, load_arc, load_blimp, load_cbt,
                                 load_cbt_file, load_hellaswag, load_lambada, load_olmo, load_piqa, olmo_docs)
from tests.conftest import shared_file
from tests.eval.conftest import cbt_block, write_jsonl, write_olmo_requests


def test_lambada_splits_at_the_last_space_in_every_format(tmp_path):
    a = load_lambada(write_jsonl(tmp_path / "a.jsonl", [{"text": "he said hello to the cat"}]))
    b = load_lambada(write_jsonl(tmp_path / "b.jsonl", [{"context": "he said hello to the", "continuation": "cat"}]))
    c = load_lambada(write_jsonl(tmp_path / "c.jsonl", [{"id": 0, "query": "he said hello to the",
                                                          "answers_text": ["cat"]}]))
    for (ex,) in (a, b, c):
        assert (ex.context, ex.target, ex.word) == ("he said hello to the", " cat", "cat")
    (nl,) = load_lambada(write_jsonl(tmp_path / "d.jsonl", [{"text": "the power of\n\nPower"}]))
    assert nl.target == " of\n\nPower"  # a target with newlines (7 of the real items)
    with pytest.raises(TaskFormatError, match="e.jsonl:1"):
        load_lambada(write_jsonl(tmp_path / "e.jsonl", [{"sentence": "x y"}]))


def test_blimp_reads_each_paradigm_file_with_its_field(tmp_path):
    write_jsonl(tmp_path / "blimp" / "wh_island.jsonl",
                [{"sentence_good": "Who ran?", "sentence_bad": "Who ran ran?", "field": "syntax", "UID": "wh_island"}])
    write_jsonl(tmp_path / "blimp" / "causative.jsonl",
                [{"sentence_good": "A.", "sentence_bad": "B.", "field": "syntax_semantics"}] * 2)
    (tmp_path / "blimp" / "._wh_island.jsonl").write_bytes(b"\x00\x05\x16\x07")  # macOS artifact in BLiMP.zip
    exs = load_blimp(tmp_path / "blimp")
    assert [e.group for e in exs] == ["causative", "causative", "wh_island"]
    assert exs[2].choices == ["Who ran?", "Who ran ran?"] and exs[2].gold == 0 and exs[2].context == ""
    assert exs[0].info["field"] == "syntax_semantics"


def test_cbt_official_format_builds_context_and_ten_candidates(tmp_path):
    path = tmp_path / "cbtest_NE_test_2500ex.txt"
    bad = cbt_block(options="cat|dog|mat")  # not 10 candidates: skipped, as the authors do
    path.write_text(cbt_block() + "\n" + bad + "\n" + cbt_block(answer="dog"))
    exs, skipped = load_cbt_file(path)
    assert len(exs) == 2 and skipped == 1
    ex = exs[0]
    assert ex.group == "NE" and len(ex.choices) == 10
    assert ex.context.startswith("The cat sat on the mat number 1. The cat sat")  # numbers stripped, detokenised
    assert ex.context.endswith("number 20. The ")
    assert ex.choices[ex.gold] == 'cat ran away, and he said "no".'
    assert exs[1].choices[exs[1].gold].startswith("dog ")
    assert cbt_detokenize("he did n't go , `` yes '' .") == 'he didn\'t go, "yes".'
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "cbtest_CN_test_2500ex.txt").write_text(cbt_block())
    (tmp_path / "d" / "cbtest_CN_train.txt").write_text(cbt_block())  # not a test file
    assert [e.group for e in load_cbt(tmp_path / "d")] == ["CN"]
    (tmp_path / "e.txt").write_text("1 a sentence .\n21 no blank here\tcat\t\tcat|dog\n")
    with pytest.raises(TaskFormatError, match="XXXXX"):
        load_cbt_file(tmp_path / "e.txt")


def test_hellaswag_preprocessing_removes_wikihow_markers():
    assert hellaswag_preprocess(" Dry [header] the car [title] Wash it.  Then  ") == "Dry the car. Wash it. Then"
    assert hellaswag_preprocess("[step] Open the door.") == " Open the door."


def test_hellaswag_raw_and_preprocessed_docs(tmp_path):
    raw = {"ind": 4, "activity_label": "Home and Garden", "ctx_a": "[header] How to dig.", "ctx_b": "you need a spade",
           "ctx": "", "label": "2", "endings": ["x.", "[step] y.", "z [title] w.", "v"], "split": "val",
           "split_type": "zeroshot", "source_id": "wikihow~1"}
    (ex,) = load_hellaswag(write_jsonl(tmp_path / "h.jsonl", [raw]))
    assert ex.context == "Home and Garden: How to dig. You need a spade"
    # lm-eval's order (strip, then remove markers) leaves the space after a leading marker, as theirs does
    assert ex.choices == [" x.", "  y.", " z. w.", " v"] and ex.gold == 2
    (doc,) = load_hellaswag(write_jsonl(tmp_path / "o.jsonl", [{"ind": 4, "query": "Q: a", "choices": ["b", "c"],
                                                                 "gold": 1}]))
    assert (doc.context, doc.choices, doc.gold) == ("Q: a", [" b", " c"], 1)


def test_piqa_reads_labels_from_the_lst_file(tmp_path):
    rows = [{"goal": " Dry a cat ", "sol1": "towel", "sol2": "oven"}, {"goal": "b", "sol1": "c", "sol2": "d"}]
    path = write_jsonl(tmp_path / "valid.jsonl", rows)
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    a, b = load_piqa(path)
    assert a.context == "Question: Dry a cat\nAnswer:" and a.choices == [" towel", " oven"] and a.gold == 0
    assert b.gold == 1
    (tmp_path / "valid-labels.lst").write_text("0\n")
    with pytest.raises(TaskFormatError, match="1 labels for 2 questions"):
        load_piqa(path)


def test_arc_both_formats_and_digit_answer_keys(tmp_path):
    ours = {"id": "Mercury_1", "query": "Question: Which is hot?\nAnswer:", "choices": ["ice", "fire", "snow"],
            "gold": 1}
    original = {"id": "NYSEDREGENTS_2015_8_28", "answerKey": "3",
                "question": {"stem": "All matter is made of", "choices": [
                    {"text": "water", "label": "1"}, {"text": "air", "label": "2"},
                    {"text": "elements", "label": "3"}, {"text": "light", "label": "4"}]}}
    a, b = load_arc(write_jsonl(tmp_path / "arc.jsonl", [ours, original]))
    assert a.context == "Question: Which is hot?\nAnswer:" and a.choices == [" ice", " fire", " snow"] and a.gold == 1
    assert b.context == "Question: All matter is made of\nAnswer:" and b.choices[b.gold] == " elements"


def test_olmo_request_files_give_each_doc_once(tmp_path):
    docs = [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1, "index": 0, "query": "Goal: g\nAnswer:",
             "choices": ["a", "b"], "gold": 1}]
    path = write_olmo_requests(tmp_path / "piqa" / "rc_0shot" / "requests.jsonl.gz", docs * 2, per_doc=4)
    assert olmo_docs(path) == docs
    (ex,) = load_olmo("piqa", path)
    assert ex.context == "Question: g\nAnswer:" and ex.gold == 1  # our prompt, not OLMo's "Goal:"
    lam = write_olmo_requests(tmp_path / "lam.jsonl.gz", [{"id": 0, "query": "the big", "answers_text": ["dog"]}])
    assert load_olmo("lambada", lam)[0].target == " dog"


def test_real_files_load_in_full():
    assert len(load_lambada(shared_file("data/lambada/lambada_test.jsonl"))) == 5153
    blimp = load_blimp(shared_file("data/blimp"))
    assert len(blimp) == 67_000 and len({e.group for e in blimp}) == 67
    assert {e.info["field"] for e in blimp} == {"morphology", "syntax", "semantics", "syntax_semantics",
                                                 "syntax/semantics"}
    assert len(load_piqa(shared_file("data/piqa/valid.jsonl"))) == 1838
    arc = load_arc(shared_file("data/arc_easy/arc_easy_test.jsonl"))
    assert len(arc) == 2376 and sum(len(e.choices) == 4 for e in arc) == 2365  # 7 have 3 choices, 4 have 5
    hs = load_hellaswag(shared_file("data/hellaswag/hellaswag_val.jsonl"))
    assert len(hs) == 10042 and all(len(e.choices) == 4 for e in hs)
    assert not any(m in c for e in hs for c in e.choices for m in ("[header]", "[step]", "[title]", "[substeps]"))
    with open(shared_file("data/hellaswag/hellaswag_val.jsonl")) as f:
        first = json.loads(f.readline())
    assert hs[0].gold == int(first["label"])
