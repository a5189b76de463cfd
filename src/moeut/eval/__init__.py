"""Evaluation: perplexity, the paper's six zero-shot tasks, and lm-evaluation-harness as a client.

    from moeut.eval import SentencePieceEncoder, evaluate, format_table
    from moeut.run import load_run

    run = load_run("runs/demo/moeut-tiny")
    results = evaluate(run.model, SentencePieceEncoder(run.tokenizer), ["ppl", "blimp", "piqa"],
                       ppl_data=["held_out.txt"])
    print(format_table(results))

A zero-shot task walks one way, one module per step, each importing only the ones before it:
:mod:`~moeut.eval.files` (find its data) → :mod:`~moeut.eval.examples` (read them) →
:mod:`~moeut.eval.candidates` (the paper's token sequences) → :mod:`~moeut.eval.scoring` (log-probabilities,
KV cache) → :mod:`~moeut.eval.aggregate` (metrics, average, table) → :mod:`~moeut.eval.evaluate` (the driver);
:mod:`~moeut.eval.encoding` (the tokenizer wrapper) is below them all, :mod:`~moeut.eval.perplexity` beside.

``moeut eval`` is the command (:mod:`moeut.cli.evaluate`); :mod:`moeut.eval.harness` (needs the ``eval``
extra, imported only on use) registers the model ``"moeut"`` with lm-eval, beside the walk: it reads the same
files (:mod:`~moeut.eval.harness_data`) and scores with the same :func:`~moeut.eval.scoring.score_candidates`.
"""

from moeut.eval.encoding import Encoder, SentencePieceEncoder
from moeut.eval.files import TASK_FILES, TASKS, TaskDataNotFound, TaskFiles, data_roots, find_task_files
from moeut.eval.examples import (Choice, Cloze, TaskFormatError, limit_examples, load_arc, load_blimp, load_cbt,
                                 load_cbt_file, load_examples, load_hellaswag, load_lambada, load_olmo, load_piqa,
                                 olmo_docs)
from moeut.eval.candidates import choice_candidates, cloze_candidate, encode_pair
from moeut.eval.scoring import (ChoiceScores, ClozeScores, TokenScores, score_candidates, score_choices,
                                score_clozes)
from moeut.eval.aggregate import (average_accuracy, choice_metrics, format_table, lm_eval_choice, paper_correct,
                                  strict_winner, summarize_choices, summarize_lambada)
from moeut.eval.perplexity import PerplexityResult, TokenArray, open_ppl_data, perplexity
from moeut.eval.evaluate import ALL_TASKS, evaluate, parse_tasks, score_lambada

__all__ = [
    "evaluate", "format_table", "parse_tasks", "limit_examples", "ALL_TASKS",
    "SentencePieceEncoder", "Encoder",
    "find_task_files", "data_roots", "TaskFiles", "TaskDataNotFound", "TASKS", "TASK_FILES",
    "Choice", "Cloze", "TaskFormatError", "load_examples", "load_lambada", "load_blimp", "load_cbt", "load_cbt_file",
    "load_hellaswag", "load_piqa", "load_arc", "load_olmo", "olmo_docs",
    "encode_pair", "choice_candidates", "cloze_candidate",
    "score_candidates", "TokenScores", "score_choices", "ChoiceScores", "score_clozes", "ClozeScores",
    "paper_correct", "strict_winner", "lm_eval_choice", "summarize_choices", "summarize_lambada", "choice_metrics",
    "average_accuracy", "score_lambada",
    "perplexity", "open_ppl_data", "PerplexityResult", "TokenArray",
]
