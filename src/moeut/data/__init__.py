"""moeut's data layer: tokenizer, document sources, token shards, and a deterministic batch sampler.

Typical use::

    from moeut.data import prepare, TokenDataset, BatchSampler

    prepare(["corpus/"], "data/")                       # or prepare(None, ...) for the default corpus
    train = TokenDataset.open("data/train")
    sampler = BatchSampler(train, batch_size=64, seq_len=1024, seed=0)
    x = sampler.batch(step)                             # LongTensor [64, 1025], pure function of (seed, step, rank)

Only the light modules are imported eagerly; ``sentencepiece``, ``pyarrow`` and ``datasets`` load when used.
"""

from moeut.data.corpus import INSTALL_COMMAND, default_corpus_dir, default_corpus_files, default_corpus_sources
from moeut.data.errors import (DataError, DecodeError, DependencyError, EmptyCorpusError, InputFormatError,
                               MissingInputError, OutputDirError, ShardError, TokenizerError, TokenizerMismatchError)
from moeut.data.mixture import (DataSource, MixtureSampler, MixtureSpecError, MixtureTokenizerError, TrainingData,
                                parse_sources)
from moeut.data.prepare import PrepareOptions, PrepareResult, prepare
from moeut.data.sampler import BatchSampler, EvalWindows, FeistelPermutation, validation_batches
from moeut.data.shards import META_FILE, ShardInfo, ShardWriter, SplitMeta, TokenDataset, token_dtype
from moeut.data.sources import (DocumentSource, HFDatasetSource, JsonlSource, ParquetSource, SourceOptions,
                                TextFileSource, iter_documents, resolve_inputs)
from moeut.data.split import split_documents
from moeut.data.streams import TokenArray, open_token_stream
from moeut.data.tokenizer import Tokenizer, TokenizerConfig, TrainingSample, train_tokenizer

__all__ = [
    "prepare", "PrepareOptions", "PrepareResult", "split_documents",
    "Tokenizer", "TokenizerConfig", "TrainingSample", "train_tokenizer",
    "TokenDataset", "TokenArray", "open_token_stream", "ShardWriter", "SplitMeta", "ShardInfo", "token_dtype", "META_FILE",
    "DataSource", "MixtureSampler", "TrainingData", "parse_sources", "MixtureSpecError", "MixtureTokenizerError",
    "BatchSampler", "EvalWindows", "FeistelPermutation", "validation_batches",
    "DocumentSource", "SourceOptions", "TextFileSource", "JsonlSource", "ParquetSource", "HFDatasetSource",
    "resolve_inputs", "iter_documents",
    "default_corpus_files", "default_corpus_dir", "default_corpus_sources", "INSTALL_COMMAND",
    "DataError", "MissingInputError", "EmptyCorpusError", "InputFormatError", "DecodeError", "DependencyError",
    "TokenizerError", "TokenizerMismatchError", "ShardError", "OutputDirError",
]
