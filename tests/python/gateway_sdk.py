"""The official openai SDK against the gateway: every feature the e2e test checks.

argv: BASE_URL MODEL. Prints one JSON line with what it saw; exits non-zero on the first
failed check (with the reason).
"""
import json
import sys

import httpx
import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
out = {}


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")


# /v1/models lists the verified workers' model.
ids = [m.id for m in client.models.list().data]
check(ids == [model], f"models {ids}")

msgs = [{"role": "user", "content": "Tell me about the sea."}]
# Non-streamed, greedy.
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
text = r.choices[0].message.content
check(r.choices[0].finish_reason in ("length", "stop"), f"finish {r.choices[0].finish_reason}")
check(r.usage.completion_tokens <= 12, f"usage {r.usage}")
out["greedy"] = text

# Streamed, greedy: the same text, chunk by chunk, and usage when asked.
pieces, finish, usage = [], None, None
for chunk in client.chat.completions.create(
    model=model, messages=msgs, max_tokens=12, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
check("".join(pieces) == text, f"stream {''.join(pieces)!r} != {text!r}")
check(finish in ("length", "stop"), f"stream finish {finish}")
check(usage is not None and usage.completion_tokens == r.usage.completion_tokens, f"stream usage {usage}")
out["stream_chunks"] = len(pieces)

# max_tokens: exactly that many tokens, finish_reason length (the synthetic model rarely stops).
r3 = client.chat.completions.create(model=model, messages=msgs, max_tokens=3, temperature=0)
check(r3.usage.completion_tokens <= 3, f"max_tokens usage {r3.usage}")
if r3.usage.completion_tokens == 3:
    check(r3.choices[0].finish_reason == "length", f"max_tokens finish {r3.choices[0].finish_reason}")

# stop: cut where the greedy text has the stop string.
long = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0)
ltext = long.choices[0].message.content
stop = None
for i in range(2, len(ltext) - 2):
    cand = ltext[i:i + 2]
    if cand.strip() and ltext.find(cand) == i:
        stop = cand
        break
if stop is not None:
    rs = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0, stop=[stop])
    check(rs.choices[0].finish_reason == "stop", f"stop finish {rs.choices[0].finish_reason}")
    check(rs.choices[0].message.content == ltext[:ltext.find(stop)], f"stop text {rs.choices[0].message.content!r} vs {ltext!r} / {stop!r}")
    out["stop"] = stop

# seed: sampling with the same seed twice gives the same text.
a = client.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=1.0, seed=7)
b = client.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=1.0, seed=7)
check(a.choices[0].message.content == b.choices[0].message.content, "seeded outputs differ")

# Legacy completions, streamed and not.
c = client.completions.create(model=model, prompt="The sea", max_tokens=6, temperature=0)
cs = "".join(x.choices[0].text for x in client.completions.create(
    model=model, prompt="The sea", max_tokens=6, temperature=0, stream=True) if x.choices)
check(c.choices[0].text == cs, f"completions {c.choices[0].text!r} != {cs!r}")

# Errors map to the SDK's exception types.
try:
    client.chat.completions.create(model="no-such-model", messages=msgs, max_tokens=2)
    check(False, "unknown model accepted")
except openai.NotFoundError as e:
    check("no-such-model" in str(e) and e.body.get("code") == "model_not_found", f"404 {e}")
try:
    client.chat.completions.create(model=model, messages=msgs, max_tokens=2, extra_body={"frobnicate": 1})
    check(False, "unknown field accepted")
except openai.BadRequestError as e:
    check("frobnicate" in str(e), f"unknown field {e}")
try:
    client.chat.completions.create(model=model, messages=msgs, max_tokens="many")
    check(False, "wrong type accepted")
except openai.BadRequestError as e:
    check("max_tokens" in str(e), f"wrong type {e}")
try:
    client.chat.completions.create(model=model, messages=msgs, max_tokens=2, stream="yes")
    check(False, "stream of the wrong type accepted")
except openai.BadRequestError as e:
    check("stream" in str(e), f"stream type {e}")
# Not JSON, no model: the gateway's own 400s.
h = httpx.post(base + "/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
check(h.status_code == 400 and "not valid JSON" in h.json()["error"]["message"], f"not json {h.status_code} {h.text}")
h = httpx.post(base + "/chat/completions", json={"messages": msgs})
check(h.status_code == 400 and h.json()["error"]["param"] == "model", f"no model {h.text}")

print(json.dumps(out))
