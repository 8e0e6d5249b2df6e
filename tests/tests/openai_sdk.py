"""Drives real guest agents with the official OpenAI Python SDK (pinned by `cargo xtask test`).

Run by tests/tests/openai_sdk.rs with SMOL_URL (SmolLM2-135M), QWEN_URL and LLAMA_URL (tiny
synthetic models with the Qwen2.5 and Llama 3.1 chat templates). The agents speak RA-TLS only;
this client does not check attestation (other e2e tests do) and accepts any certificate.
Prints one `OK ...` line per check; any failure raises.
"""

import json
import os
import sys
import time

import httpx
import jsonschema
import openai
from pydantic import BaseModel

OUTPUTS_PER_SCHEMA = int(os.environ.get("OUTPUTS_PER_SCHEMA", "100"))


def client(url):
    return openai.OpenAI(
        base_url=url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(verify=False, timeout=600),
    )


def model_of(c):
    return c.models.list().data[0].id


SCHEMAS = {
    "nested_object": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}},
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "address"],
        "additionalProperties": False,
    },
    "arrays_enums": {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "level": {"enum": ["low", "high"]},
            "ok": {"type": "boolean"},
        },
        "required": ["colors", "level", "ok"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "price": {"type": "number"},
            "count": {"type": "integer"},
            "ratio": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        },
        "required": ["price", "count", "ratio"],
        "additionalProperties": False,
    },
}


def structured_outputs(c, model):
    for name, schema in SCHEMAS.items():
        t0 = time.time()
        got = 0
        seed = 0
        while got < OUTPUTS_PER_SCHEMA:
            n = min(8, OUTPUTS_PER_SCHEMA - got)
            r = c.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Answer in JSON."}],
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": schema, "strict": True},
                },
                temperature=1.0,
                n=n,
                seed=seed,
                max_tokens=64,
            )
            seed += 1
            assert len(r.choices) == n
            for ch in r.choices:
                obj = json.loads(ch.message.content)
                jsonschema.validate(obj, schema)
                assert ch.finish_reason == "stop", ch
                got += 1
        print(f"OK {OUTPUTS_PER_SCHEMA} outputs validate against {name} ({time.time() - t0:.1f} s)")

    r = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "A JSON object please."}],
        response_format={"type": "json_object"},
        temperature=1.0,
        n=4,
        max_tokens=48,
    )
    for ch in r.choices:
        assert isinstance(json.loads(ch.message.content), dict)
    print("OK json_object")

    # The SDK's Pydantic helper: a strict schema with $defs/$ref.
    class City(BaseModel):
        name: str
        population: int

    class Trip(BaseModel):
        title: str
        stops: list[City]
        rating: float

    r = c.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Plan a trip."}],
        response_format=Trip,
        temperature=1.0,
        max_tokens=120,
    )
    trip = r.choices[0].message.parsed
    assert isinstance(trip, Trip), r
    print(f"OK chat.completions.parse -> {trip!r}")

    # Streaming with include_usage: the deltas make the same JSON.
    schema = SCHEMAS["nested_object"]
    kwargs = dict(
        model=model,
        messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        temperature=1.0,
        seed=42,
        max_tokens=80,
    )
    whole = c.chat.completions.create(**kwargs).choices[0].message.content
    text = ""
    usage = None
    for chunk in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
    assert text == whole, (text, whole)
    assert usage and usage.completion_tokens > 0
    jsonschema.validate(json.loads(text), schema)
    print("OK streamed structured output")

    # Logprobs come back for constrained output too.
    r = c.chat.completions.create(logprobs=True, top_logprobs=2, **kwargs)
    lp = r.choices[0].logprobs.content
    assert lp and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in lp)
    # A token may hold part of a character (byte-level BPE: an emoji spans several tokens,
    # whose `token` strings cannot show half a character): the tokens' `bytes` make the text.
    content = r.choices[0].message.content
    assert b"".join(bytes(e.bytes) for e in lp).decode() == content, ([e.token for e in lp], content)
    for e in lp:
        try:
            whole = bytes(e.bytes).decode()
        except UnicodeDecodeError:
            continue  # part of a character
        assert e.token == whole, (e.token, e.bytes)
    print("OK logprobs")


def cache_salt(c, model):
    # vLLM's cache_salt through the SDK's extra_body: the same greedy answer with and without a
    # salt (the salt only keeps cached prompt prefixes apart).
    base = dict(model=model, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=8, temperature=0)
    plain = c.chat.completions.create(**base).choices[0].message.content
    for salt in ["tenant-a", "tenant-a", "tenant-b"]:
        got = c.chat.completions.create(**base, extra_body={"cache_salt": salt}).choices[0].message.content
        assert got == plain, (salt, got, plain)
    print("OK cache_salt accepted, answers unchanged")


def bad_requests(c, model):
    base = dict(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=4)
    big = {f"f{i}": {"type": "string"} for i in range(2000)}
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a"}}}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": big}}}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"top_logprobs": 25, "logprobs": True}, "top_logprobs"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"extra_body": {"cache_salt": ""}}, "cache_salt"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ]
    for extra, param in cases:
        try:
            c.chat.completions.create(**base, **extra)
        except openai.BadRequestError as e:
            assert e.body["param"] == param, (param, e.body)
            assert param in e.body["message"], e.body
        else:
            raise AssertionError(f"{extra} was accepted")
    for extra, param in [({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"), ({"echo": True, "logprobs": 1}, "echo")]:
        try:
            c.completions.create(model=model, prompt="x", max_tokens=2, **extra)
        except openai.BadRequestError as e:
            assert e.body["param"] == param, (param, e.body)
        else:
            raise AssertionError(f"{extra} was accepted")
    print(f"OK {len(cases) + 3} bad requests are 400 naming the field")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]


def check_call(call):
    spec = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])


def tool_round_trip(label, c):
    model = model_of(c)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = c.chat.completions.create(model=model, messages=ask, tools=TOOLS, tool_choice="required", temperature=1.0, seed=1, max_tokens=200)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    assert ch.message.tool_calls, ch
    for call in ch.message.tool_calls:
        check_call(call)
    call = ch.message.tool_calls[0]
    # Named choice, streamed: delta.tool_calls accumulate to a valid call.
    stream = c.chat.completions.create(
        model=model, messages=ask, tools=TOOLS, parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=1.0, seed=2, max_tokens=200, stream=True,
    )
    calls = {}
    finish = None
    for chunk in stream:
        for d in chunk.choices:
            for tc in d.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function.name:
                    entry["name"] += tc.function.name
                entry["arguments"] += tc.function.arguments or ""
            finish = d.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1, (finish, calls)
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), TOOLS[0]["function"]["parameters"])
    # The call and its result go back; the model answers in text.
    messages = ask + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})},
    ]
    r = c.chat.completions.create(model=model, messages=messages, tools=TOOLS, temperature=0, max_tokens=16)
    final = r.choices[0]
    assert final.finish_reason in ("stop", "length", "tool_calls"), final
    if final.message.tool_calls:
        for tc in final.message.tool_calls:
            check_call(tc)
    else:
        assert isinstance(final.message.content, str)
    try:
        c.chat.completions.create(model=model, messages=ask, tools=TOOLS + TOOLS[:1], max_tokens=4)
    except openai.BadRequestError as e:
        assert e.body["param"] == "tools"
    else:
        raise AssertionError("duplicate tool names were accepted")
    try:
        c.chat.completions.create(model=model, messages=ask, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}, max_tokens=4)
    except openai.BadRequestError as e:
        assert e.body["param"] == "tool_choice"
    else:
        raise AssertionError("unknown tool_choice was accepted")
    print(f"OK {label}: tool call, streamed call, tool result, answer ({final.finish_reason})")


def main():
    smol = client(os.environ["SMOL_URL"])
    model = model_of(smol)
    t0 = time.time()
    structured_outputs(smol, model)
    cache_salt(smol, model)
    bad_requests(smol, model)
    tool_round_trip("qwen2.5-shaped", client(os.environ["QWEN_URL"]))
    tool_round_trip("llama3.1-shaped", client(os.environ["LLAMA_URL"]))
    print(f"OK all ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
