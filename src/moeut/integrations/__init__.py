"""Integrations of moeut with other tools.

* :mod:`moeut.integrations.hf`: export a run to a Hugging Face ``transformers`` model directory (and back).

Nothing heavy is imported here: each integration loads its optional dependency when it is used.
"""
