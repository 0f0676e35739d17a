"""Structured output: grammars compiled and refused with reasons, masks in the batched sampler,
constrained and free requests in one batch, logit_bias."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from model_runtime.config import EngineConfig
from model_runtime.engine.engine import Engine
from model_runtime.engine.guided import GuidedDecoding
from model_runtime.engine.sampler import apply_logit_bias
from model_runtime.errors import InvalidRequestError
from model_runtime.inputs.processor import Processor
from model_runtime.loading.checkpoint import load_checkpoint
from model_runtime.loading.tiny import write_tiny_checkpoint
from model_runtime.loading.tiny_tokenizers import write_tokenizer
from model_runtime.loading.tokenizer import load_tokenizer
from model_runtime.request import ChatInput, Message, OutputFormat, RequestOutput
from model_runtime.sampling_params import SamplingParams
from model_runtime.structured.grammar import GrammarCompiler
from model_runtime.structured.tokenizer import build_ll_tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=["qwen2", "internlm2", "phi3"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp(request.param)
    write_tokenizer(path, request.param)
    tokenizer = load_tokenizer(path)
    eos = [tokenizer.eos_token_id]
    return tokenizer, build_ll_tokenizer(tokenizer, len(tokenizer) + 7, eos)


def test_schemas_compile_and_refusals_name_the_reason(family) -> None:
    _, ll = family
    compiler = GrammarCompiler(ll)
    first = compiler.json_schema(PERSON, strict=True, param="p")
    assert compiler.json_schema(PERSON, strict=True, param="p") is first  # cached by source
    with pytest.raises(InvalidRequestError, match="Unknown format: bogus") as info:
        compiler.json_schema({"type": "string", "format": "bogus"}, strict=True, param="response_format.x")
    assert info.value.param == "response_format.x"
    unsupported = {"type": "object", "dependentSchemas": {"a": {}}}
    with pytest.raises(InvalidRequestError, match="dependentSchemas"):
        compiler.json_schema(unsupported, strict=True, param="p")
    compiler.json_schema(unsupported, strict=False, param="p")  # not strict: the keyword is ignored
    with pytest.raises(InvalidRequestError):
        compiler.lark("start: (", kind="lark", param="p")


def _allowed(guided: GuidedDecoding, seq, vocab: int) -> set[int]:
    logits = torch.zeros(1, vocab)
    assert guided.apply([seq], logits) == []
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


class _Seq:
    def __init__(self, matcher) -> None:
        self.matcher = matcher


def test_special_tokens_never_match_text_inside_json(family) -> None:
    tokenizer, ll = family
    constraint = GrammarCompiler(ll).json_schema({"type": "string"}, strict=True, param="p")
    matcher = constraint.matcher(ll)
    assert matcher.consume_tokens(ll.greedy_tokenize('"'))
    inside = _allowed(GuidedDecoding(ll.vocab_size), _Seq(matcher), ll.vocab_size)
    for text in ("<IMG_CONTEXT>", "<img>", tokenizer.eos_token):
        token = tokenizer.convert_tokens_to_ids(text)
        assert token not in inside, text
    assert len(inside) > 50  # ordinary text is allowed


def test_masks_apply_per_row_and_failures_are_reported(family) -> None:
    _, ll = family
    vocab = ll.vocab_size
    constraint = GrammarCompiler(ll).json_schema(PERSON, strict=True, param="p")
    guided = GuidedDecoding(vocab)
    free, bound = _Seq(None), _Seq(constraint.matcher(ll))
    logits = torch.randn(2, vocab)
    before = logits.clone()
    assert guided.apply([free, bound], logits) == []
    assert torch.equal(logits[0], before[0])  # the free row is untouched
    allowed = torch.isfinite(logits[1])
    assert 0 < int(allowed.sum()) < vocab // 2  # '{' and friends only
    assert torch.equal(logits[1][allowed], before[1][allowed])
    broken = _Seq(constraint.matcher(ll))
    broken.matcher.consume_token(vocab - 1)  # an id the tokenizer does not know: the matcher errs
    logits = torch.randn(1, vocab)
    failed = guided.apply([broken], logits)
    assert [seq for seq, _ in failed] == [broken] and torch.isfinite(logits).all()


def test_logit_bias_adds_per_row() -> None:
    logits = torch.zeros(2, 6)
    apply_logit_bias(logits, [[(1, 5.0), (3, -100.0)], []])
    assert logits[0].tolist() == [0, 5, 0, -100, 0, 0] and logits[1].tolist() == [0] * 6


# -- through the engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory):
    path: Path = write_tiny_checkpoint(tmp_path_factory.mktemp("structured"))
    config = EngineConfig(model=str(path), max_model_len=2048)
    loaded = load_checkpoint(config)
    engine = Engine(loaded, config)
    return engine, Processor(loaded, config, engine.vision_cache)


def run(harness, requests: dict[str, tuple[ChatInput, SamplingParams]]) -> dict[str, list[RequestOutput]]:
    engine, processor = harness
    outputs: dict[str, list[RequestOutput]] = {}
    for rid, (chat, params) in requests.items():
        request = processor.process(rid, chat, params)
        request.sink = outputs.setdefault(rid, []).append
        engine.add(request)
    for _ in range(5000):
        if not engine.scheduler.has_work:
            return outputs
        engine.step()
    raise AssertionError("the engine did not finish")


def texts(outputs: list[RequestOutput]) -> dict[int, tuple[str, str | None]]:
    result: dict[int, list] = {}
    for out in outputs:
        for delta in out.deltas:
            text, reason = result.setdefault(delta.index, ["", None])
            result[delta.index] = [text + delta.text, delta.finish_reason or reason]
    return {i: (t, r) for i, (t, r) in result.items()}


def test_constrained_and_free_requests_share_a_batch(harness) -> None:
    """A random model emits schema-valid JSON whenever it stops; free requests in the same steps
    are unaffected; n > 1 choices each follow the grammar; seeds and logprobs work."""
    schema_chat = ChatInput(
        (Message("user", ("Describe a person",)),),
        output_format=OutputFormat("json_schema", PERSON, strict=True),
    )
    free_chat = ChatInput((Message("user", ("Hello",)),))
    requests = {
        f"json{i}": (schema_chat, SamplingParams(max_tokens=400, seed=i, n=2, logprobs=True, top_logprobs=2))
        for i in range(3)
    }
    requests["object"] = (
        ChatInput((Message("user", ("{",)),), output_format=OutputFormat("json_object")),
        SamplingParams(max_tokens=400, seed=11),
    )
    requests["free"] = (free_chat, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    alone = run(harness, {"free-alone": requests["free"]})
    outputs = run(harness, requests)
    stopped = 0
    for rid in [r for r in requests if r.startswith("json")]:
        for text, reason in texts(outputs[rid]).values():
            if reason == "stop":
                jsonschema.validate(json.loads(text), PERSON)
                stopped += 1
        logprobs = [lp for out in outputs[rid] for d in out.deltas for lp in d.logprobs or []]
        assert logprobs and all(len(lp.top) == 2 for lp in logprobs)
    assert stopped >= 4
    text, reason = texts(outputs["object"])[0]
    assert reason == "length" or isinstance(json.loads(text), dict)
    assert texts(outputs["free"]) == texts(alone["free-alone"])  # the batch did not change it


def test_a_budget_too_small_ends_with_length_not_broken_json(harness) -> None:
    chat = ChatInput(
        (Message("user", ("x",)),), output_format=OutputFormat("json_schema", PERSON, strict=True)
    )
    out = run(harness, {"short": (chat, SamplingParams(max_tokens=3, seed=1))})["short"]
    assert texts(out)[0][1] == "length"


def test_logit_bias_forces_and_bans(harness) -> None:
    engine, processor = harness
    target = processor.loaded.tokenizer.encode("A", add_special_tokens=False)[0]
    chat = ChatInput((Message("user", ("Hi",)),))
    forced = run(
        harness, {"f": (chat, SamplingParams(max_tokens=5, logit_bias=((target, 100.0),), ignore_eos=True))}
    )
    assert all(t == target for out in forced["f"] for d in out.deltas for t in d.token_ids)
    with pytest.raises(InvalidRequestError, match="vocabulary") as info:
        processor.process("bad", chat, SamplingParams(logit_bias=((10**7, 1.0),)))
    assert info.value.param == "logit_bias"
