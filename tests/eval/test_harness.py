"""lm-evaluation-harness client: log-likelihoods against brute force, one local task end to end."""

from __future__ import annotations

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval (the 'eval' extra) is not installed")

from lm_eval.api.instance import Instance  # noqa: E402

from moeut.eval.harness import MoEUTHarnessLM, run_harness  # noqa: E402
from moeut.model import MoEUTLM  # noqa: E402
from tests.eval.conftest import CharEncoder, write_task_data  # noqa: E402
from tests.model.helpers import tiny_config  # noqa: E402


def _req(kind: str, args: tuple, i: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def _logprobs(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        lp = model(torch.tensor([tokens])).logits.float().log_softmax(-1)[0]
    return lp[:-1].gather(-1, torch.tensor(tokens[1:])[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = MoEUTLM(tiny_config(vocab_size=len(CharEncoder().token_bytes()), context_length=24)).eval()
    return MoEUTHarnessLM(model=model, encoder=CharEncoder(), batch_size=3)


def test_moeut_is_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("moeut") is MoEUTHarnessLM


def test_loglikelihood_equals_brute_force_sum_of_token_logprobs(lm):
    enc = lm.encoder
    pairs = [("the cat sat", " on"), ("the cat sat", " in the"), ("the cat sat ", "under"), ("dog", " ran"),
             ("", "hello there"), ("a very long context that does not fit the window", " at all")]
    got = lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        if ctx.endswith(" "):  # lm-eval moves the context's trailing space to the continuation
            ctx, cont = ctx[:-1], " " + cont
        c = enc.encode_context(ctx) if ctx else [enc.eos_id]
        whole = (c + enc.encode_context(cont))[-(lm.max_length + 1):]
        lp = _logprobs(lm.model, whole)[-len(cont):]
        assert ll == pytest.approx(lp.sum().item(), abs=1e-4)
        assert isinstance(greedy, bool)


def test_loglikelihood_rolling_covers_every_token_once(lm):
    text = "abcdefghij" * 6  # 60 characters: three windows of the 24-token context
    (total,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))], disable_tqdm=True)
    toks = lm.encoder.encode_context(text)
    want, T = 0.0, lm.max_length
    for start in range(0, len(toks), T):  # disjoint windows, each conditioned on the previous tokens
        ctx = ([lm.eot_token_id] + toks)[max(0, start + 1 - T):start + 1] if start else [lm.eot_token_id]
        piece = toks[start:start + T]
        want += _logprobs(lm.model, (ctx + piece)[-(T + 1):])[-len(piece):].sum().item()
    assert total == pytest.approx(want, abs=1e-3)


def test_generate_until_stops_at_the_stop_string(lm):
    (out,) = lm.generate_until([_req("generate_until", ("abc", {"until": ["\n"], "max_gen_toks": 5}))],
                               disable_tqdm=True)
    assert isinstance(out, str) and "\n" not in out and len(out) <= 5


def test_a_local_harness_task_runs_end_to_end_offline(tiny_run, tmp_path, monkeypatch):
    from moeut.eval.encoding import SentencePieceEncoder
    from tests.run_helpers import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = write_task_data(tmp_path / "data", n=3)
    res = run_harness(["piqa", "lambada"], model=load_model(tiny_run), encoder=SentencePieceEncoder.load(tiny_run),
                      data_dir=data, limit=3, batch_size=4, verbose=False)
    assert res["results"]["piqa"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert "perplexity,none" in res["results"]["lambada_openai"]
    assert res["n-samples"]["piqa"]["effective"] == 3


def test_the_blimp_group_runs_on_the_real_files(tiny_run, monkeypatch):
    from moeut.eval.encoding import SentencePieceEncoder
    from tests.run_helpers import load_model
    from tests.conftest import shared_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = shared_file("data").resolve()
    res = run_harness(["blimp"], model=load_model(tiny_run), encoder=SentencePieceEncoder.load(tiny_run),
                      data_dir=data, limit=1, batch_size=16, verbose=False)
    assert "acc,none" in res["groups"]["blimp"]
    assert sum(k.startswith("blimp_") for k in res["results"]) == 67
