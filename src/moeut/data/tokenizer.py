"""SentencePiece BPE tokenizer: training on a bounded sample, and a small wrapper to load and use it.

The defaults follow the MoEUT paper (SentencePiece, BPE, 8000 pieces, digits split) and make the
tokenizer lossless: identity normalisation, no whitespace collapsing, and byte fallback, so
``decode(encode(text)) == text`` for any text (newlines and rare characters become byte pieces).

Files written by :func:`train_tokenizer` into a directory:

* ``tokenizer.model``: the SentencePiece model;
* ``tokenizer.json``: metadata (format version, the model's sha256, vocab size, special ids,
  ``sentencepiece.__version__``, the training config and sample size).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import io
import os
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeut.data.errors import DependencyError, EmptyCorpusError, TokenizerError, TokenizerMismatchError
from moeut.fileio import atomic_write_bytes, atomic_write_json, read_json, sha256_file

TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_FORMAT = "moeut-tokenizer"
TOKENIZER_FORMAT_VERSION = 1


def _spm() -> Any:
    try:
        import sentencepiece
    except ImportError:  # pragma: no cover - sentencepiece is a core dependency
        raise DependencyError("the tokenizer needs sentencepiece: pip install sentencepiece") from None
    return sentencepiece


@dataclass(frozen=True)
class TokenizerConfig:
    """How to train the tokenizer. Defaults: the paper's 8000-piece BPE, lossless.

    ``max_sample_bytes`` bounds the text the trainer sees: documents are picked deterministically
    (smallest seeded hash first) until the budget is full. Lines longer than ``max_sentence_chars``
    are cut into pieces at spaces (SentencePiece drops over-long sentences).

    Training is deterministic: the same sample and config give a byte-identical model. The model
    file records the config, ``num_threads`` included, so that is a fixed number (16, SentencePiece's
    default; BPE training barely uses threads) rather than this machine's core count.
    """

    vocab_size: int = 8000
    model_type: str = "bpe"
    character_coverage: float = 0.9995
    split_digits: bool = True
    byte_fallback: bool = True
    normalization_rule_name: str = "identity"
    remove_extra_whitespaces: bool = False
    add_dummy_prefix: bool = True
    allow_whitespace_only_pieces: bool = True
    max_sentencepiece_length: int = 16
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 3
    max_sample_bytes: int = 64 << 20
    max_sentence_chars: int = 4096
    seed: int = 0
    num_threads: int = 16

    def __post_init__(self) -> None:
        if self.vocab_size < 8:
            raise ValueError(f"vocab_size must be at least 8, got {self.vocab_size}")
        if self.eos_id < 0:
            raise ValueError("eos_id must be >= 0: documents are separated by the EOS token")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(f"character_coverage must be in (0, 1], got {self.character_coverage}")
        if self.max_sample_bytes <= 0 or self.max_sentence_chars <= 0 or self.num_threads <= 0:
            raise ValueError("max_sample_bytes, max_sentence_chars and num_threads must be positive")

    def trainer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``sentencepiece.SentencePieceTrainer.train``."""
        return dict(
            vocab_size=self.vocab_size, model_type=self.model_type, character_coverage=self.character_coverage,
            split_digits=self.split_digits, byte_fallback=self.byte_fallback,
            normalization_rule_name=self.normalization_rule_name,
            remove_extra_whitespaces=self.remove_extra_whitespaces, add_dummy_prefix=self.add_dummy_prefix,
            allow_whitespace_only_pieces=self.allow_whitespace_only_pieces,
            max_sentencepiece_length=self.max_sentencepiece_length,
            unk_id=self.unk_id, bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id,
            input_sentence_size=0, shuffle_input_sentence=False,  # the sample is already bounded and deterministic
            max_sentence_length=4 * self.max_sentence_chars + 16,  # bytes; our sentences are at most this long
            num_threads=self.num_threads,
            minloglevel=2,  # errors only; sentencepiece logs every step otherwise
        )


def _priority(text: str, seed: int) -> int:
    data = text.encode("utf-8", "surrogatepass")
    key = b"moeut-spm" + seed.to_bytes(8, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little")


class TrainingSample:
    """A deterministic, bounded sample of documents for tokenizer training.

    Keeps the documents with the smallest seeded content hash while their total UTF-8 size stays
    within ``max_bytes`` (plus at most one document). Memory is bounded by the budget; the result
    does not depend on the order documents arrive in, only on their contents and the seed.
    """

    def __init__(self, max_bytes: int, seed: int = 0) -> None:
        self.max_bytes = max_bytes
        self.seed = seed
        self._heap: list[tuple[int, int, str]] = []  # (-priority, -index, text): a max-heap on priority
        self._bytes = 0
        self.documents_seen = 0
        self.bytes_seen = 0

    def add(self, index: int, text: str) -> None:
        """Offer document number ``index``."""
        size = len(text.encode("utf-8", "surrogatepass"))
        self.documents_seen += 1
        self.bytes_seen += size
        prio = _priority(text, self.seed)
        if self._bytes >= self.max_bytes and self._heap and -self._heap[0][0] <= prio:
            return
        heapq.heappush(self._heap, (-prio, -index, text))
        self._bytes += size
        while self._bytes - self._size(self._heap[0][2]) >= self.max_bytes and len(self._heap) > 1:
            self._bytes -= self._size(heapq.heappop(self._heap)[2])

    @staticmethod
    def _size(text: str) -> int:
        return len(text.encode("utf-8", "surrogatepass"))

    def documents(self, exclude: Container[int] = ()) -> list[str]:
        """The sampled documents in index order, leaving out the indices in ``exclude`` (e.g. validation)."""
        kept = sorted((-neg_i, text) for _, neg_i, text in self._heap if -neg_i not in exclude)
        return [text for _, text in kept]

    def __len__(self) -> int:
        return len(self._heap)


def training_sentences(documents: Iterable[str], max_chars: int = 4096, max_bytes: int | None = None) -> Iterator[str]:
    """Lines of the documents, as SentencePiece wants its input: no empty lines, none over ``max_chars``.

    Long lines are cut at the last space before the limit (or hard at the limit). Stops after
    ``max_bytes`` bytes of text when given.
    """
    total = 0
    for doc in documents:
        for line in doc.splitlines():
            while line.strip():
                if len(line) <= max_chars:
                    piece, line = line, ""
                else:
                    cut = line.rfind(" ", max_chars // 2, max_chars)
                    cut = cut if cut > 0 else max_chars
                    piece, line = line[:cut], line[cut:]
                if piece.strip():
                    yield piece
                    total += len(piece.encode("utf-8", "surrogatepass"))
                    if max_bytes is not None and total >= max_bytes:
                        return


class Tokenizer:
    """A trained SentencePiece model with its ids and checksum. Build with :meth:`load` or :func:`train_tokenizer`."""

    def __init__(self, model_path: Path, *, metadata: dict[str, Any] | None = None) -> None:
        spm = _spm()
        self.model_path = Path(model_path)
        self.sha256 = sha256_file(self.model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.model_path} is not a SentencePiece model ({e}); retrain it "
                                 "(moeut prepare without --tokenizer) or pass the right file") from None
        self.vocab_size: int = int(self._sp.get_piece_size())
        self.eos_id: int = int(self._sp.eos_id())
        self.bos_id: int = int(self._sp.bos_id())
        self.pad_id: int = int(self._sp.pad_id())
        self.unk_id: int = int(self._sp.unk_id())
        if self.eos_id < 0:
            raise TokenizerError(f"{self.model_path} has no EOS piece, which separates documents; retrain it "
                                 "with eos_id >= 0 (moeut's tokenizer training does this)")
        self.metadata: dict[str, Any] = metadata if metadata is not None else self._describe()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load ``tokenizer.model``, ``tokenizer.json``, or a directory holding them.

        When ``tokenizer.json`` sits next to the model, its recorded sha256 must match the model file.
        """
        path = Path(path)
        if path.is_dir():
            model, meta_path = path / TOKENIZER_MODEL, path / TOKENIZER_JSON
        elif path.suffix == ".json":
            meta_path = path
            meta = read_json(path, "tokenizer metadata", "pass the tokenizer.model file instead", TokenizerError)
            model = path.parent / str(meta.get("model_file", TOKENIZER_MODEL))
        else:
            model, meta_path = path, path.with_suffix(".json")
        if not model.is_file():
            raise TokenizerError(f"tokenizer model {model} does not exist; pass an existing tokenizer.model "
                                 "(or the directory holding it), or omit --tokenizer to train one")
        meta = None
        if meta_path.is_file():
            meta = read_json(meta_path, "tokenizer metadata", f"delete it to use {model} alone", TokenizerError)
        tok = cls(model, metadata=meta)
        if meta is not None:
            recorded = meta.get("sha256")
            if recorded != tok.sha256:
                raise TokenizerMismatchError(
                    f"{model} has sha256 {tok.sha256} but {meta_path} records {recorded}: the model was replaced "
                    f"after training; put back the matching pair, or delete {meta_path} to trust the model")
            tok.metadata = meta
        return tok

    def _describe(self) -> dict[str, Any]:
        return {
            "format": TOKENIZER_FORMAT, "format_version": TOKENIZER_FORMAT_VERSION, "model_file": self.model_path.name,
            "sha256": self.sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "bos_id": self.bos_id,
            "pad_id": self.pad_id, "unk_id": self.unk_id, "sentencepiece_version": _spm().__version__,
        }

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Token ids of each text, encoded by SentencePiece's own thread pool (all cores by default)."""
        if not texts:
            return []
        return self._sp.encode(list(texts), num_threads=num_threads or max(1, os.cpu_count() or 1))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; EOS/BOS/PAD decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Copy ``tokenizer.model`` and ``tokenizer.json`` into ``out_dir``; returns the new model path."""
        out_dir = Path(out_dir)
        atomic_write_bytes(out_dir / TOKENIZER_MODEL, self.model_path.read_bytes())
        atomic_write_json(out_dir / TOKENIZER_JSON, {**self.metadata, "model_file": TOKENIZER_MODEL})
        return out_dir / TOKENIZER_MODEL

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"sha256={self.sha256[:12]}...)")


def train_tokenizer(documents: Iterable[str] | TrainingSample, out_dir: str | os.PathLike[str],
                    config: TokenizerConfig = TokenizerConfig(), *, exclude: Container[int] = ()) -> Tokenizer:
    """Train a SentencePiece tokenizer on (a bounded sample of) ``documents``; write it into ``out_dir``.

    ``documents`` is either an iterable of texts (sampled here, see :class:`TrainingSample`) or a
    ready :class:`TrainingSample`; ``exclude`` drops sample indices (the validation documents).
    Writes ``tokenizer.model`` and ``tokenizer.json``; returns the loaded :class:`Tokenizer`.
    """
    spm = _spm()
    if isinstance(documents, TrainingSample):
        sample = documents
    else:
        sample = TrainingSample(config.max_sample_bytes, config.seed)
        for i, text in enumerate(documents):
            sample.add(i, text)
    docs = sample.documents(exclude)
    sentences = list(training_sentences(docs, config.max_sentence_chars, config.max_sample_bytes))
    if not sentences:
        raise EmptyCorpusError("no text to train the tokenizer on: every document is empty or whitespace")
    n_bytes = sum(len(s.encode("utf-8", "surrogatepass")) for s in sentences)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=writer, **config.trainer_kwargs())
    except RuntimeError as e:
        msg = str(e).split("] ", 1)[-1]
        fix = ("use a larger --vocab-size (byte fallback and the special pieces need 260, plus one per frequent "
               "character) or a lower character_coverage") if "required_chars" in msg else \
            "use a smaller --vocab-size or more text"
        raise TokenizerError(f"SentencePiece training failed ({msg}); the sample had {len(sentences)} lines and "
                             f"{n_bytes} bytes: {fix}") from None
    out_dir = Path(out_dir)
    model_path = out_dir / TOKENIZER_MODEL
    atomic_write_bytes(model_path, writer.getvalue())
    tok = Tokenizer(model_path)
    tok.metadata = {
        **tok.metadata,
        "config": dataclasses.asdict(config),
        "training_sample": {"documents": len(docs), "sentences": len(sentences), "bytes": n_bytes,
                            "documents_seen": sample.documents_seen, "bytes_seen": sample.bytes_seen},
    }
    atomic_write_json(out_dir / TOKENIZER_JSON, tok.metadata)
    return tok
