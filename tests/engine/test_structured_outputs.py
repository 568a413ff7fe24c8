"""Structured outputs offline, on the embedded demo model: every output under a JSON
schema validates (a few hundred generated schemas plus real-world ones, greedy and
sampled), regex outputs fullmatch, choices are in the set, grammar outputs parse; a
constrained request gives the same tokens alone as in a batch mixing constrained and
free requests; invalid constraints fail with ValueError naming the field."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import pytest

from lanner import LLM, SamplingParams
from lanner.engine import structured_output
from lanner.engine.structured_output import MAX_JSON_WHITESPACE
from lanner.sampling_params import StructuredOutputsParams
from tests.engine.test_llm import assert_pool_full, summary

MAX_TOKENS = 200
DEMO_DRAFT = Path(__file__).resolve().parents[2] / "lanner/assets/demo-draft"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", device="cpu", block_size=16, max_model_len=512, max_num_seqs=256)


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A JSON schema of the kinds APIs use, bounded so outputs end well inside MAX_TOKENS."""
    # No bare "number": its digits have no bound, and the demo model may never stop one.
    kinds = ["string", "integer", "boolean", "enum", "null"]
    if depth < 2:
        kinds += ["object", "object", "array"]
    kind = rng.choice(kinds)
    if kind == "string":
        schema: dict[str, Any] = {"type": "string", "maxLength": rng.randint(1, 12)}
        if rng.random() < 0.3:
            schema["minLength"] = 1
        return schema
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", 1, 2, True], 3)}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": 3}
    names = rng.sample(
        ["id", "name", "age", "tags", "size", "kind", "ok", "score"], rng.randint(1, 4)
    )
    properties = {name: random_schema(rng, depth + 1) for name in names}
    required = [n for n in names if rng.random() < 0.7]
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


REAL_WORLD_SCHEMAS = [
    {  # an OpenAI-style function's parameters
        "type": "object",
        "properties": {
            "location": {"type": "string", "maxLength": 20},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location", "unit"],
        "additionalProperties": False,
    },
    {  # a pydantic model's schema (definitions and refs)
        "$defs": {
            "Item": {
                "properties": {
                    "sku": {"type": "string", "maxLength": 8},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                },
                "required": ["sku", "qty"],
                "type": "object",
            }
        },
        "properties": {
            "order_id": {"type": "integer", "minimum": 0, "maximum": 100000},
            "items": {"items": {"$ref": "#/$defs/Item"}, "type": "array", "maxItems": 2},
        },
        "required": ["order_id", "items"],
        "type": "object",
    },
    {  # optional fields and a nullable one
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 15},
            "year": {
                "anyOf": [{"type": "integer", "minimum": 1900, "maximum": 2100}, {"type": "null"}]
            },
        },
        "required": ["title"],
    },
]


PROMPTS = ["def describe(item):\n    return ", "data = ", "# JSON\n", "config = {"]


def test_every_output_validates_against_its_schema(llm: LLM) -> None:
    # Compact JSON: the tiny demo model, free to put whitespace between tokens, fills its
    # budget with it (the next test covers that mode).
    rng = random.Random(0)
    schemas = [random_schema(rng) for _ in range(300)] + REAL_WORLD_SCHEMAS * 4
    params = [
        SamplingParams(
            max_tokens=MAX_TOKENS,
            temperature=0.0 if i % 2 == 0 else 0.8,
            seed=i,
            structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True),
        )
        for i, schema in enumerate(schemas)
    ]
    outputs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(schemas))], params)
    for schema, output in zip(schemas, outputs, strict=True):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)
    assert_pool_full(llm)


def test_any_whitespace_json_is_bounded_and_valid(llm: LLM) -> None:
    rng = random.Random(1)
    schemas = [random_schema(rng) for _ in range(24)] + REAL_WORLD_SCHEMAS
    params = [
        SamplingParams(
            max_tokens=MAX_TOKENS,
            temperature=0.0 if i % 2 == 0 else 0.8,
            seed=i,
            structured_outputs=StructuredOutputsParams(json=schema),
        )
        for i, schema in enumerate(schemas)
    ]
    outputs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(schemas))], params)
    finished = 0
    for schema, output in zip(schemas, outputs, strict=True):
        completion = output.outputs[0]
        runs = re.findall(r"\s+", completion.text)
        assert max(map(len, runs), default=0) <= MAX_JSON_WHITESPACE, completion.text
        if completion.finish_reason == "stop":
            finished += 1
            jsonschema.validate(json.loads(completion.text), schema)
    assert finished >= len(schemas) // 2
    assert_pool_full(llm)


def test_regex_choice_grammar_and_any_json(llm: LLM) -> None:
    regexes = [r"def [a-z_]{1,12}\((x|y)?\):", r"[0-9]{3}-[0-9]{4}", r"(True|False)"]
    choices = ["yes", "no", "maybe not"]
    arithmetic = 'root ::= expr\nexpr ::= term ("+" term)*\nterm ::= [0-9]+ | "(" expr ")"'
    constraints = (
        [StructuredOutputsParams(regex=r) for r in regexes]
        + [StructuredOutputsParams(choice=choices)]
        + [StructuredOutputsParams(grammar=arithmetic)]
        + [StructuredOutputsParams(json_object=True)]
    )
    for temperature in (0.0, 1.0):
        params = [
            SamplingParams(
                max_tokens=MAX_TOKENS, temperature=temperature, seed=7, structured_outputs=c
            )
            for c in constraints
        ]
        outputs = [o.outputs[0] for o in llm.generate(["x = "] * len(params), params)]
        for regex, out in zip(regexes, outputs, strict=False):
            assert re.fullmatch(regex, out.text), (regex, out.text)
        assert outputs[3].text in choices
        expression = outputs[4].text
        assert re.fullmatch(r"[0-9()+]+", expression) and eval(expression) >= 0  # noqa: S307
        if outputs[5].finish_reason == "stop":
            assert isinstance(json.loads(outputs[5].text), dict)
    assert_pool_full(llm)


def test_constrained_requests_batch_like_alone(llm: LLM) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    constrained = SamplingParams(
        temperature=0.0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=schema)
    )
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(
        temperature=0.9,
        seed=3,
        max_tokens=30,
        structured_outputs=StructuredOutputsParams(regex="[a-z ]{5,30}"),
    )
    alone = [
        llm.generate("count = ", constrained)[0],
        llm.generate("import os\n", free)[0],
        llm.generate("name = '", seeded)[0],
    ]
    batch = llm.generate(
        ["count = ", "import os\n", "name = '"] * 3 + ["for i in range"],
        [constrained, free, seeded] * 3 + [free],
    )
    for index, output in enumerate(batch[:9]):
        assert summary(output) == summary(alone[index % 3])
    # n > 1: each sample follows the grammar with its own matcher.
    samples = llm.generate("x = ", seeded.clone(n=3))[0]
    assert len({c.text for c in samples.outputs}) > 1
    assert all(re.fullmatch("[a-z ]{5,30}", c.text) for c in samples.outputs)
    assert_pool_full(llm)


def test_preemption_keeps_the_grammar(tmp_path_factory: pytest.TempPathFactory) -> None:
    small = LLM(
        dtype="float32", device="cpu", block_size=4, max_model_len=128, num_gpu_blocks_override=40
    )
    schema = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": 25,
        "maxItems": 30,
    }
    params = SamplingParams(
        temperature=0.0, max_tokens=90, structured_outputs=StructuredOutputsParams(json=schema)
    )
    alone = small.generate("numbers = ", params)[0]
    together = small.generate(["numbers = "] * 4, params)
    assert small.engine.core.scheduler.num_preemptions > 0
    for output in together:
        assert summary(output) == summary(alone)
        if output.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(output.outputs[0].text), schema)
    assert_pool_full(small)


@pytest.mark.parametrize(
    ("constraint", "words"),
    [
        (
            {"json": '{"type": "object", "properties": '},
            "structured_outputs.json is not valid JSON",
        ),
        ({"json": {"type": "no-such-type"}}, "structured_outputs.json is invalid"),
        ({"regex": "(unclosed"}, "structured_outputs.regex is invalid"),
        ({"grammar": "root ::= "}, "structured_outputs.grammar is invalid"),
        ({"choice": []}, "exactly one of"),
        ({"regex": "a", "choice": ["b"]}, "exactly one of"),
    ],
)
def test_invalid_constraints_are_value_errors(llm: LLM, constraint: dict, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)) as info:
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(**constraint)))
    assert "/project/" not in str(info.value) and ".cc:" not in str(info.value)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculation_never_accepts_what_the_grammar_refuses(llm: LLM, method: str) -> None:
    # The prompt's compact JSON is what n-gram lookup copies; without free whitespace the
    # grammar wants json.dumps's ", " and ": ", so verification must turn drafts down.
    rows = '[{"id":1,"name":"ab"},{"id":2,"name":"cd"}]'
    prompt = f"rows = {rows}\nrows = {rows}\nrows = "
    schema = {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 4}},
            "required": ["id", "name"],
            "additionalProperties": False,
        },
        "minItems": 2,
        "maxItems": 4,
    }
    constraint = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    params = [
        SamplingParams(temperature=0.0, max_tokens=120, structured_outputs=constraint),
        SamplingParams(temperature=0.9, seed=5, max_tokens=120, structured_outputs=constraint),
    ]
    expected = llm.generate([prompt] * 2, params, use_tqdm=False)
    # Every step speculates (the adaptive rule times steps, so would vary run to run).
    config: dict[str, Any] = {
        "method": method,
        "num_speculative_tokens": 4,
        "adaptive_draft_length": False,
    }
    if method == "draft_model":
        config["model"] = str(DEMO_DRAFT)
    spec = LLM(
        dtype="float32",
        device="cpu",
        block_size=16,
        max_model_len=512,
        speculative_config=config,
    )
    got = spec.generate([prompt] * 2, params, use_tqdm=False)
    assert summary(got[0]) == summary(expected[0])
    for output in got:
        assert output.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(output.outputs[0].text), schema)
    stats = spec.engine.core.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert_pool_full(spec)


def test_overlapped_scheduling_gives_the_same_constrained_outputs(llm: LLM) -> None:
    # With async scheduling a constrained step's model runs ahead and its sampling waits
    # for the step before (its grammar state); the outputs must be the synchronous ones.
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    constraints = [
        StructuredOutputsParams(json=schema, disable_any_whitespace=True),
        StructuredOutputsParams(regex="[a-z ]{5,30}"),
        StructuredOutputsParams(choice=["alpha", "beta", "gamma"]),
        None,
    ]
    params = [
        SamplingParams(
            temperature=0.0 if i % 2 else 0.8,
            seed=i,
            max_tokens=40,
            presence_penalty=0.5 if i % 3 == 0 else 0.0,
            structured_outputs=constraints[i % len(constraints)],
        )
        for i in range(16)
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    expected = llm.generate(prompts, params, use_tqdm=False)
    overlapped = LLM(
        dtype="float32", device="cpu", block_size=16, max_model_len=512, async_scheduling=True
    )
    runner = overlapped.engine.core.runner
    deferred = []
    sample_deferred = runner.sample_deferred
    runner.sample_deferred = lambda pending, *wait: (
        deferred.append(1),
        sample_deferred(pending, *wait),
    )[1]
    manager = overlapped.engine.core.structured_outputs
    # Rows a step filled: on the fill thread (which then advanced the grammars first), or
    # here (then sampled at once).
    fills: list[tuple[int, bool]] = []
    start_fill = manager.start_fill

    def counted(grammars: list, *advance: Any) -> Any:
        fills.append((len(grammars), bool(advance)))
        return start_fill(grammars, *advance)

    manager.start_fill = counted
    got = overlapped.generate(prompts, params, use_tqdm=False)
    assert [summary(o) for o in got] == [summary(o) for o in expected]
    assert len(deferred) > 10  # the model ran ahead of the grammar's step
    threaded = [rows for rows, advanced in fills if advanced]
    assert min(threaded) >= structured_output.THREAD_FILL_ROWS  # both ways
    assert min(rows for rows, advanced in fills if not advanced) < min(threaded)
    assert_pool_full(overlapped)


def test_step_bitmasks_share_one_reused_buffer(llm: LLM) -> None:
    # A step's bitmasks are rows of one host buffer (two, used in turn), filled now or
    # on the fill thread alike, each row exactly the matcher's own mask; a row after a
    # refused draft allows everything even where the reused buffer held a mask before.
    import torch
    import xgrammar

    from lanner.runner.sampler import SamplingRow, apply_grammar_bitmasks

    manager = llm.engine.core.structured_outputs
    constraints = [
        StructuredOutputsParams(json={"type": "object"}),
        StructuredOutputsParams(regex="[a-c]{3}"),
        StructuredOutputsParams(choice=["yes", "no"]),
    ]
    grammars = [manager.grammar_for(c) for c in constraints]
    for grammar in grammars:
        grammar.wait(30)
        assert grammar.ready and grammar.error is None

    def own_mask(grammar: Any) -> torch.Tensor:
        words = xgrammar.allocate_token_bitmask(1, manager.vocab_size)
        grammar.matcher.fill_next_token_bitmask(words, 0)
        return words[0]

    def allowed(mask: torch.Tensor) -> list[int]:
        return [t for t in range(manager.vocab_size) if (int(mask[t // 32]) >> (t % 32)) & 1]

    expected = [own_mask(g) for g in grammars]
    accepted, refused = allowed(expected[1])[0], allowed(expected[2])[0]
    assert refused not in allowed(expected[0])
    rows = manager.fill_bitmasks(grammars, [[], [accepted], []])
    assert [(r.start, r.count) for r in rows] == [(0, 1), (1, 2), (3, 1)]
    assert len({id(r.bitmasks) for r in rows}) == 1 and rows[0].bitmasks.num_rows == 4
    for row, mask in zip(rows, expected, strict=True):
        assert torch.equal(row.words()[0], mask)
    assert grammars[1].accept(accepted)  # the mask after the draft: the matcher's, then
    assert torch.equal(rows[1].words()[1], own_mask(grammars[1]))
    grammars[1].matcher.rollback(1)
    first_buffer = rows[0].bitmasks.words

    # From THREAD_FILL_ROWS rows (here: one) the rows fill on the fill thread.
    with mock.patch.object(structured_output, "THREAD_FILL_ROWS", 1):
        background = manager.start_fill(grammars)
    manager.wait_for_fill()
    assert background[0].bitmasks.words is not first_buffer  # the other buffer
    for row, mask in zip(background, expected, strict=True):
        assert torch.equal(row.words()[0], mask)

    again = manager.fill_bitmasks(grammars, [[refused, accepted], [], []])
    assert again[0].bitmasks.words is first_buffer  # reused, its old rows overwritten
    assert torch.equal(again[0].words()[0], expected[0])
    assert bool((again[0].words()[1:] == -1).all())  # after the refused draft: anything
    assert torch.equal(again[1].words()[0], expected[1])

    # Applied in one launch through the rows' indexes, whatever their order.
    logits = torch.randn(4, manager.vocab_size)
    params = SamplingParams()
    sampling = [SamplingRow(params, [1], [], (0,)) for _ in range(4)]
    for i, source in ((0, background[2]), (2, background[0]), (3, background[1])):
        sampling[i].token_bitmask = source
    masked = apply_grammar_bitmasks(logits, sampling)
    for i, mask in ((0, expected[2]), (1, None), (2, expected[0]), (3, expected[1])):
        keep = set(allowed(mask)) if mask is not None else set(range(manager.vocab_size))
        finite = set(torch.isfinite(masked[i]).nonzero().flatten().tolist())
        assert finite == keep

    sampling[1].token_bitmask = again[0]  # another step's buffer
    with pytest.raises(ValueError, match="one step's buffer"):
        apply_grammar_bitmasks(logits, sampling)

    # Under THREAD_FILL_ROWS rows the fill runs at once, on the caller's thread.
    inline = manager.start_fill(grammars)
    assert manager._filling is None
    for row, mask in zip(inline, expected, strict=True):
        assert torch.equal(row.words()[0], mask)


def test_grammars_accept_alike_one_by_one_and_in_one_call(llm: LLM) -> None:
    # From THREAD_FILL_ROWS grammars, accept_each advances them in one xgrammar call: it
    # must say what each grammar's own accept says (taken, refused, ended by a stop token).
    from lanner.engine.structured_output import RequestGrammar

    manager = llm.engine.core.structured_outputs
    constraint = StructuredOutputsParams(choice=["yes", "no"])

    def walk(count: int) -> tuple[list[list[bool]], list[bool]]:
        grammars = [manager.grammar_for(constraint) for _ in range(count)]
        for grammar in grammars:
            grammar.wait(30)
            assert grammar.ready and grammar.error is None
        tokenizer = llm.get_tokenizer()
        words = [tokenizer.encode(w, add_special_tokens=False) for w in ("yes", "no", "z")]
        results = []
        for step in range(max(len(w) for w in words) + 2):
            # Each grammar its word's tokens (one in three a word the choice refuses),
            # then a stop token, then anything.
            tokens = [
                words[i % 3][step] if step < len(words[i % 3]) else g.matcher.stop_token_ids[0]
                for i, g in enumerate(grammars)
            ]
            results.append(RequestGrammar.accept_each(grammars, tokens))
        return results, [g.is_terminated for g in grammars]

    count = structured_output.THREAD_FILL_ROWS + 1
    many = walk(count)
    with mock.patch.object(structured_output, "THREAD_FILL_ROWS", count + 1):
        one_by_one = walk(count)
    assert many == one_by_one
    results, terminated = many
    assert not all(results[0]) and any(results[0])  # some refused their first token
    assert any(terminated) and not all(terminated)


def test_the_grammar_compiler_is_kept_out_of_full_collections(llm: LLM) -> None:
    # xgrammar's modules and a compiler come after the engine froze what it holds: frozen
    # in turn (with one collection first), full collections do not scan them each time.
    import gc

    import xgrammar

    core = llm.engine.core.structured_outputs
    manager = structured_output.StructuredOutputManager(
        core.tokenizer_source, core.vocab_size, core.eos_token_ids
    )
    grammar = manager.grammar_for(StructuredOutputsParams(regex="[ab]{2}"))
    grammar.wait(30)
    assert grammar.ready and grammar.error is None
    tracked = {id(obj) for obj in gc.get_objects()}
    assert id(manager._compiler) not in tracked
    assert id(vars(xgrammar)) not in tracked
    manager.shutdown()


def test_a_refusal_found_on_the_fill_thread_aborts_its_request() -> None:
    # From THREAD_FILL_ROWS rows the fill thread advances the grammars while the loop
    # applies the step (assuming each took its token, which its mask allowed). Should one
    # refuse, its request ends aborted in that same step; the others go on unharmed.
    import xgrammar

    overlapped = LLM(
        dtype="float32", device="cpu", block_size=16, max_model_len=512, async_scheduling=True
    )
    constraint = StructuredOutputsParams(regex="[a-z ]{30,60}")
    params = SamplingParams(temperature=0.0, max_tokens=16, structured_outputs=constraint)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(10)]
    expected = overlapped.generate(prompts, params, use_tqdm=False)
    original = xgrammar.BatchGrammarMatcher.batch_accept_token
    calls = []

    def refuse_once(matchers: list, tokens: list[int], *rest: Any) -> list[bool]:
        accepted = [bool(ok) for ok in original(matchers, tokens, *rest)]
        calls.append(len(matchers))
        if len(calls) == 3:
            accepted[0] = False  # the first row of the third batched advance
        return accepted

    with mock.patch.object(xgrammar.BatchGrammarMatcher, "batch_accept_token", refuse_once):
        got = overlapped.generate(prompts, params, use_tqdm=False)
    assert len(calls) > 3 and min(calls) >= structured_output.THREAD_FILL_ROWS
    aborted = [i for i, o in enumerate(got) if o.outputs[0].finish_reason == "abort"]
    assert len(aborted) == 1
    kept = [i for i in range(len(got)) if i not in aborted]
    assert [summary(got[i]) for i in kept] == [summary(expected[i]) for i in kept]
    cut, whole = (o[aborted[0]].outputs[0].token_ids for o in (got, expected))
    assert len(cut) < len(whole) and list(cut) == list(whole[: len(cut)])
    assert_pool_full(overlapped)
