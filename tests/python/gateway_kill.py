"""A stream whose worker dies: after the first chunk the script prints STARTED and waits for a
line on stdin (the test kills the worker then); the rest of the stream must raise the SDK's
APIError (an error event), never end as if complete. Then a new request must succeed.

argv: BASE_URL MODEL MAX_TOKENS. Prints one JSON line.
"""
import json
import sys

import openai

base, model, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
s = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell a long story."}],
                              max_tokens=max_tokens, temperature=0, stream=True)
it = iter(s)
first = next(it)
print("STARTED", flush=True)
sys.stdin.readline()
out = {"chunks": 1}
try:
    finish = None
    for chunk in it:
        out["chunks"] += 1
        for ch in chunk.choices:
            if ch.finish_reason:
                finish = ch.finish_reason
    out["result"] = f"completed without error (finish {finish})"
except openai.APIError as e:
    out["result"] = "error"
    out["message"] = str(e)
# New requests go to the other worker.
r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
out["after"] = r.choices[0].finish_reason
print(json.dumps(out), flush=True)
