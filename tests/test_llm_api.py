"""vLLM's Python API on the single-process engine: chat for one or many conversations, dict
prompts, get_tokenizer, logprob objects, progress bar, and what each new SamplingParams field
does to real generations (prompt logprobs against transformers)."""

from __future__ import annotations

import json

import pytest
import torch

from afd import LLM, SamplingParams
from afd.builtin import resolve_model
from afd.outputs import Logprob
from afd.sampling.params import StructuredOutputsParams

MODEL = "tiny-qwen3-moe"


@pytest.fixture(scope="module")
def llm():
    with LLM(MODEL, dtype="float32", block_size=4, max_num_batched_tokens=8) as llm:
        yield llm


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **{"max_tokens": 8, "ignore_eos": True, **kw})


def test_prompt_forms_chat_and_tokenizer(llm, capsys):
    tok = llm.get_tokenizer()
    ids = tok.encode("Hello there")
    outs = llm.generate(
        ["Hello there", ids, {"prompt": "Hello there"}, {"prompt_token_ids": ids}],
        greedy(),
        use_tqdm=False,
    )
    assert capsys.readouterr().err == ""
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert [o.prompt_token_ids for o in outs] == [ids] * 4
    assert llm.generate({"prompt_token_ids": ids}, greedy(), use_tqdm=False)[0].prompt is None
    for bad in ({"prompt": 5}, {"prompt_token_ids": ["a"]}, {"prompt": "x", "extra": 1}, 3.5):
        with pytest.raises(ValueError):
            llm.generate(bad, greedy(), use_tqdm=False)
    conversation = [{"role": "user", "content": "Hi!"}]
    one = llm.chat(conversation, greedy(), use_tqdm=False)
    many = llm.chat([conversation, [{"role": "user", "content": "Bye"}]], greedy(), use_tqdm=False)
    assert isinstance(one, list) and len(one) == 1 and len(many) == 2
    assert one[0].outputs[0].token_ids == many[0].outputs[0].token_ids
    text = tok.apply_chat_template(conversation, add_generation_prompt=True)
    assert one[0].prompt_token_ids == tok.encode(text, add_special_tokens=False)
    with pytest.raises(ValueError):
        llm.chat([], greedy())
    llm.generate(["a", "b"], greedy(max_tokens=2))  # use_tqdm defaults to True, as in vLLM
    assert "Processed prompts: 100%" in capsys.readouterr().err


def test_logprob_objects_have_rank_and_text(llm):
    tok = llm.get_tokenizer()
    out = llm.generate("Hello", greedy(logprobs=3), use_tqdm=False)[0].outputs[0]
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert all(isinstance(v, Logprob) for v in entry.values())
        assert entry[token].rank == 1  # greedy picks the most likely token
        ranks = sorted(v.rank for v in entry.values())
        assert ranks == [1, 2, 3]
        by_rank = sorted(entry.values(), key=lambda v: v.rank)
        assert [v.logprob for v in by_rank] == sorted((v.logprob for v in by_rank), reverse=True)
        assert entry[token].decoded_token == tok.decode([token], skip_special_tokens=False)
    sampled = llm.generate(
        "Hello", SamplingParams(temperature=5.0, seed=3, max_tokens=8, logprobs=0), use_tqdm=False
    )[0].outputs[0]
    # at a high temperature some picks are not the favourite: their rank says how far down
    ranks = [e[t].rank for t, e in zip(sampled.token_ids, sampled.logprobs, strict=True)]
    assert all(r >= 1 for r in ranks) and max(ranks) > 1


def test_prompt_logprobs_match_transformers_through_chunks_and_the_prefix_cache(llm):
    from transformers import AutoModelForCausalLM

    prompt = list(range(40, 70))  # 30 tokens: 4 chunks of at most 8
    params = greedy(max_tokens=2, prompt_logprobs=2)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    again = llm.generate([prompt], params, use_tqdm=False)[0]  # prefix cached: still computed
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)  # [T, V]
    for out in (first, again):
        lps = out.prompt_logprobs
        assert len(lps) == len(prompt) and lps[0] is None
        for p in range(1, len(prompt)):
            entry = lps[p]
            want = ref[p - 1]
            assert abs(entry[prompt[p]].logprob - float(want[prompt[p]])) < 1e-3
            assert entry[prompt[p]].rank == int((want > want[prompt[p]]).sum()) + 1
            top = sorted(((v.rank, t) for t, v in entry.items() if v.rank <= 2))
            assert [t for _, t in top] == want.topk(2).indices.tolist()
    assert llm.generate([prompt], greedy(), use_tqdm=False)[0].prompt_logprobs is None


def test_each_field_changes_generation_as_specified(llm):
    tok = llm.get_tokenizer()
    base = llm.generate("Hello", greedy(max_tokens=12), use_tqdm=False)[0].outputs[0]
    # logit_bias +100 makes greedy pick the token; -100 on the favourite moves greedy off it
    biased = llm.generate("Hello", greedy(logit_bias={77: 100}), use_tqdm=False)[0].outputs[0]
    assert biased.token_ids == [77] * 8
    away = llm.generate(
        "Hello", greedy(max_tokens=1, logit_bias={base.token_ids[0]: -100}), use_tqdm=False
    )[0].outputs[0]
    assert away.token_ids[0] != base.token_ids[0]
    # min_tokens: EOS (boosted to be the favourite) only after 5 tokens; then it ends the output
    eos = tok.eos_token_id
    no_min = SamplingParams(temperature=0, max_tokens=20, logit_bias={eos: 100})
    assert llm.generate("Hello", no_min, use_tqdm=False)[0].outputs[0].token_ids == [eos]
    with_min = SamplingParams(temperature=0, max_tokens=20, min_tokens=5, logit_bias={eos: 100})
    out = llm.generate("Hello", with_min, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == eos and eos not in out.token_ids[:5]
    assert out.finish_reason == "stop"
    # penalties: the base output repeats tokens; penalised outputs change and repeat less
    assert len(set(base.token_ids)) < len(base.token_ids)
    for field in ({"repetition_penalty": 2.0}, {"frequency_penalty": 2.0},
                  {"presence_penalty": 2.0}):  # fmt: skip
        pen = llm.generate("Hello", greedy(max_tokens=12, **field), use_tqdm=False)[0].outputs[0]
        assert pen.token_ids != base.token_ids, field
        assert len(set(pen.token_ids)) > len(set(base.token_ids)), field
    # a negative presence penalty rewards repeats instead
    rep = llm.generate("Hello", greedy(max_tokens=12, presence_penalty=-2.0), use_tqdm=False)
    assert len(set(rep[0].outputs[0].token_ids)) < len(set(base.token_ids))


def test_stop_text_special_tokens_and_structured_outputs(llm):
    tok = llm.get_tokenizer()
    base = llm.generate("Hello", greedy(max_tokens=12), use_tqdm=False)[0].outputs[0]
    stop = base.text[4:7]
    cut = llm.generate("Hello", greedy(max_tokens=12, stop=[stop]), use_tqdm=False)[0].outputs[0]
    kept = llm.generate(
        "Hello", greedy(max_tokens=12, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]  # fmt: skip
    assert cut.text == base.text[: base.text.find(stop)]
    assert kept.text == cut.text + stop and kept.finish_reason == "stop"
    # a special token in the output: dropped from the text unless skip_special_tokens=False
    im_start = tok.token_to_id("<|im_start|>")
    bias = {im_start: 100}
    shown = llm.generate(
        "Hello", greedy(max_tokens=2, logit_bias=bias, skip_special_tokens=False), use_tqdm=False
    )[0].outputs[0]
    hidden = llm.generate("Hello", greedy(max_tokens=2, logit_bias=bias), use_tqdm=False)
    assert shown.text == "<|im_start|>" * 2 and hidden[0].outputs[0].text == ""
    # EOS ends the output without its text, even with skip_special_tokens=False
    eos = {tok.eos_token_id: 100}
    end = SamplingParams(temperature=0, max_tokens=4, logit_bias=eos, skip_special_tokens=False)
    assert llm.generate("Hello", end, use_tqdm=False)[0].outputs[0].text == ""
    # structured outputs on the real (random) model
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for so, check in [
        (StructuredOutputsParams(json=schema), lambda t: json.loads(t)["ok"] in (True, False)),
        (StructuredOutputsParams(choice=["yes", "no"]), lambda t: t in ("yes", "no")),
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]:
        p = SamplingParams(temperature=0, max_tokens=40, structured_outputs=so)
        out = llm.generate("Hello", p, use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and check(out.text), out.text
    with pytest.raises(ValueError, match="invalid structured output regex"):
        llm.generate("Hello", SamplingParams(structured_outputs=StructuredOutputsParams(regex="(")))
    with pytest.raises(ValueError, match="out of range"):
        llm.generate("Hello", SamplingParams(logit_bias={10**6: 1}))
