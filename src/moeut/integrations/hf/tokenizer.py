"""A SentencePiece model as a Hugging Face fast tokenizer (``tokenizer.json``) that encodes and decodes like it.

moeut's tokenizer is SentencePiece BPE with identity normalisation, a dummy-prefix space, no whitespace
collapsing, whitespace-only pieces, split digits and byte fallback. The ``tokenizers`` pipeline that
reproduces it:

* normalizer: [the SentencePiece charsmap, if any] → [strip + collapse spaces, if the model does] →
  prepend ``▁`` (dummy prefix) → replace ``" "`` by ``▁``;
* pre-tokenizer: split into SentencePiece's "words" — a word starts at the beginning or at a ``▁`` that does
  not follow another ``▁`` (with whitespace-only pieces allowed; otherwise at every ``▁``);
* model: BPE with the SentencePiece vocabulary, merges ordered by the score of the merged piece, byte fallback
  (or Unigram with the piece scores for a unigram model);
* decoder: the unknown piece → SentencePiece's ``unk_surface`` (" ⁇ "), ``▁`` → space, byte pieces → bytes, fuse,
  drop the dummy-prefix space.

The paper's released tokenizers use SentencePiece's default ``nmt_nfkc`` normalisation with whitespace
collapsing and no byte fallback (unknown characters become ``<unk>``); the same pipeline reproduces them, the
``precompiled_charsmap`` of the model applied by ``normalizers.Precompiled``.

No BOS/EOS is added (moeut trains on raw ``encode`` ids). The special pieces (``<unk>``, ``<s>``, ``</s>``,
``<pad>``) are special tokens: ``decode(..., skip_special_tokens=True)`` drops them like SentencePiece does;
``split_special_tokens`` makes their spelling in a text plain characters, as SentencePiece treats it.
:func:`check_round_trip` compares the result with SentencePiece on a set of texts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moeut.data.errors import DependencyError

# SentencePiece ModelProto piece types and model types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2

ROUND_TRIP_TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "", " ", "   ", "a", " leading space", "  two leading spaces", "trailing spaces  ", "a  b   c    d",
    "tab\tseparated\tvalues", "line one\nline two\n\nline four\n", "\r\nwindows\r\n",
    "digits 0123456789 and 3.14159, 1,000,000 and 2024-06-01", "x1y22z333",
    "über naïve café — “quotes” ‘single’ … ñ Ø ß ẞ", "東京 數據 日本語のテキスト", "emoji 🙂😀👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Ω ∑ √ ∞ ≠ ≤", "\u00a0non-breaking\u00a0space", "ﬁ ligature ＦＵＬＬＷＩＤＴＨ", "zero\u200bwidth",
    "def f(x):\n    return x ** 2  # comment\n", "{\"json\": [1, 2, 3], \"ok\": true}",
    "UPPER lower MiXeD", "end.", "literal <s> and </s> and <unk> and <pad> in the text",
]


def _model_proto(model_path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # protobuf missing
        raise DependencyError("exporting the tokenizer needs protobuf to read the SentencePiece model: "
                          "pip install protobuf (or pip install 'moeut[hf]')") from e
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    return proto


def special_pieces(model_path: str | Path) -> dict[str, str | None]:
    """Names of the unk/bos/eos/pad pieces (None where the model has no such piece)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    out: dict[str, str | None] = {}
    for name, i in (("unk", sp.unk_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id())):
        out[name] = sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None
    return out


def sentencepiece_to_tokenizers(model_path: str | Path):
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece model at ``model_path``."""
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE, Unigram
    except ImportError as e:
        raise DependencyError("exporting the tokenizer needs the tokenizers package: pip install 'moeut[hf]'") from e

    proto = _model_proto(Path(model_path))
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix:
        raise ValueError(f"{model_path}: SentencePiece models with treat_whitespace_as_suffix are not supported")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    unk_id = next((i for i, (_, _, t) in enumerate(pieces) if t == _UNKNOWN), None)

    if trainer.model_type == _BPE:
        mergeable = {piece for piece, _, t in pieces if t in (_NORMAL, _USER_DEFINED)}
        merges: list[tuple[str, str]] = []
        # SentencePiece merges the adjacent pair whose merged piece scores highest: order merges by that score
        for piece, _score, _t in sorted(((p, s, t) for p, s, t in pieces if t == _NORMAL),
                                        key=lambda x: (-x[1], vocab[x[0]])):
            local = [(vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:]) for k in range(1, len(piece))
                     if piece[:k] in mergeable and piece[k:] in mergeable]
            merges.extend((left, right) for _, _, left, right in sorted(local))
        model = BPE(vocab=vocab, merges=merges, unk_token=pieces[unk_id][0] if unk_id is not None else None,
                    fuse_unk=True, byte_fallback=bool(trainer.byte_fallback))
    elif trainer.model_type == _UNIGRAM:
        model = Unigram([(piece, score) for piece, score, _ in pieces], unk_id, bool(trainer.byte_fallback))
    else:
        raise ValueError(f"{model_path}: SentencePiece model type {trainer.model_type} is not supported "
                         "(only BPE and unigram)")

    tok = Tokenizer(model)
    steps: list[Any] = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    # SentencePiece's SplitIntoWords: a word starts at the beginning or at a ▁ (one that does not follow
    # another ▁ when whitespace-only pieces are allowed)
    words = r"▁*[^▁]+|▁+" if trainer.allow_whitespace_only_pieces else r"[^▁]+|▁[^▁]*"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(words), behavior="isolated")
    # SentencePiece decodes the unknown piece as its unk_surface (" ⁇ " by default), not as its spelling
    steps = [decoders.Replace(pieces[unk_id][0], trainer.unk_surface)] if unk_id is not None else []
    steps += [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                            for piece, _, t in pieces if t in (_UNKNOWN, _CONTROL)])
    return tok


def write_tokenizer_files(model_path: str | Path, out_dir: str | Path, *, model_max_length: int) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and a copy of the
    SentencePiece ``tokenizer.model`` into ``out_dir``; ``AutoTokenizer.from_pretrained(out_dir)`` loads them
    (a ``PreTrainedTokenizerFast``) without sentencepiece."""
    out_dir = Path(out_dir)
    tok = sentencepiece_to_tokenizers(model_path)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer.model").write_bytes(Path(model_path).read_bytes())
    special = special_pieces(model_path)
    tokens = {f"{name}_token": piece for name, piece in special.items() if piece is not None}
    if "pad_token" not in tokens and "eos_token" in tokens:
        tokens["pad_token"] = tokens["eos_token"]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "add_bos_token": False,
        "add_eos_token": False,
        # "<s>", "</s>", ... written in the text are plain characters, as for SentencePiece (and in training)
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2, ensure_ascii=False) + "\n")
    return [out_dir / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "tokenizer.model")]


def check_round_trip(model_path: str | Path, encode, decode, texts: Iterable[str] = ROUND_TRIP_TEXTS) -> list[str]:
    """Texts on which ``encode``/``decode`` (e.g. a transformers tokenizer's) differ from SentencePiece:
    the ids of ``encode(text)`` must equal SentencePiece's and ``decode`` of them its decoding."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    bad = []
    for text in texts:
        ids = sp.encode(text)
        if list(encode(text)) != ids or decode(ids) != sp.decode(ids):
            bad.append(text)
    return bad
