"""``!function`` targets of the task YAMLs in this folder: moeut's local-file datasets."""

from moeut.eval.harness_data import arc_easy, blimp, hellaswag, lambada_openai, piqa  # noqa: F401
