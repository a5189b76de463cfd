"""``!function`` targets of the task YAMLs in this folder: moeut's local-file datasets.

lm-eval imports this module when it loads one of these tasks (``moeut eval --harness``, or the ``lm_eval`` CLI
with ``--include_path`` this folder); that also quiets lm-eval's ``git describe`` outside a git checkout
(:func:`moeut.eval.harness_data.quiet_git_hash`)."""

from moeut.eval.harness_data import arc_easy, blimp, hellaswag, lambada_openai, piqa, quiet_git_hash  # noqa: F401

quiet_git_hash()
