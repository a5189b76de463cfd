"""Evaluation: perplexity, the paper's six zero-shot tasks, and lm-evaluation-harness as a client.

    from moeut.eval import SentencePieceEncoder, evaluate, format_table
    from moeut.train import load_model

    model = load_model("runs/demo/moeut-tiny")
    encoder = SentencePieceEncoder.load("runs/demo/moeut-tiny")
    results = evaluate(model, encoder, ["ppl", "blimp", "piqa"], ppl_data=["held_out.txt"])
    print(format_table(results))

``moeut eval`` is the command (:mod:`moeut.eval.cli`); :mod:`moeut.eval.harness` (needs the ``eval``
extra, imported only on use) registers the model ``"moeut"`` with lm-eval.
"""

from moeut.eval.data import TASK_FILES, TASKS, TaskData, TaskDataNotFound, data_roots, find_task_data
from moeut.eval.encoding import Encoder, SentencePieceEncoder, encode_pair
from moeut.eval.evaluate import ALL_TASKS, evaluate, format_table, limit_examples, parse_tasks
from moeut.eval.perplexity import PerplexityResult, TokenArray, open_ppl_data, perplexity
from moeut.eval.scoring import TokenScores, lm_eval_choice, paper_correct, score_candidates, strict_winner
from moeut.eval.tasks import (Choice, Cloze, TaskFormatError, load_arc, load_blimp, load_cbt, load_cbt_file,
                              load_hellaswag, load_lambada, load_olmo, load_piqa, olmo_docs)
from moeut.eval.zeroshot import (ChoiceScores, average_accuracy, choice_metrics, score_choices, score_lambada,
                                 summarize_choices)

__all__ = [
    "evaluate", "format_table", "parse_tasks", "limit_examples", "ALL_TASKS",
    "SentencePieceEncoder", "Encoder", "encode_pair",
    "perplexity", "open_ppl_data", "PerplexityResult", "TokenArray",
    "score_candidates", "TokenScores", "paper_correct", "strict_winner", "lm_eval_choice",
    "score_choices", "score_lambada", "summarize_choices", "choice_metrics", "average_accuracy", "ChoiceScores",
    "Choice", "Cloze", "TaskFormatError", "load_lambada", "load_blimp", "load_cbt", "load_cbt_file",
    "load_hellaswag", "load_piqa", "load_arc", "load_olmo", "olmo_docs",
    "find_task_data", "data_roots", "TaskData", "TaskDataNotFound", "TASKS", "TASK_FILES",
]
