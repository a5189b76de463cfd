"""The MoEUT paper's released checkpoints (written by ``RobertCsordas/moeut_training_code``) in moeut.

* :func:`from_paper_checkpoint`: a ``.ckpt`` file → a moeut model (eval mode);
* :func:`import_paper_run`: → a moeut run directory (``moeut import-paper``);
* :func:`to_paper_checkpoint`: a moeut model → a checkpoint dict in the release format (round trips).

Reading never unpickles anything but containers and tensors (:mod:`moeut.integrations.paper.reader`).
"""

from moeut.integrations.paper.convert import (UnsupportedVariantError, config_from_paper_args, paper_args_for,
                                              to_paper_checkpoint)
from moeut.integrations.paper.load import (PaperImport, from_paper_checkpoint, import_paper_run,
                                           load_paper_checkpoint)
from moeut.integrations.paper.reader import (PaperCheckpointError, UnsafeCheckpointError, read_paper_checkpoint,
                                             unsafe_globals)

__all__ = ["from_paper_checkpoint", "load_paper_checkpoint", "import_paper_run", "to_paper_checkpoint",
           "config_from_paper_args", "paper_args_for", "read_paper_checkpoint", "unsafe_globals", "PaperImport",
           "PaperCheckpointError", "UnsafeCheckpointError", "UnsupportedVariantError"]
