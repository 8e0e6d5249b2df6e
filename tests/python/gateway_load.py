"""N concurrent streaming clients through the gateway for a bounded time; every stream must be
complete (finish_reason, no error) and equal to the single-request greedy answer of its prompt.

argv: BASE_URL MODEL CLIENTS SECONDS MAX_TOKENS. Prints one JSON line; exits non-zero on any
incomplete or wrong stream.
"""
import json
import sys
import threading
import time

import openai

base, model = sys.argv[1], sys.argv[2]
clients, seconds, max_tokens = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(8)]


def make():
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)


# References: one request at a time.
ref = {}
c0 = make()
for p in prompts:
    r = c0.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                   max_tokens=max_tokens, temperature=0)
    ref[p] = r.choices[0].message.content

lock = threading.Lock()
done, bad, first_errors = [0], [], []
end = time.monotonic() + seconds
start_all = threading.Barrier(clients)


def run(i):
    c = make()
    start_all.wait()
    n = 0
    while time.monotonic() < end:
        p = prompts[(i + n) % len(prompts)]
        n += 1
        try:
            text, finish = [], None
            for chunk in c.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                                   max_tokens=max_tokens, temperature=0, stream=True):
                for ch in chunk.choices:
                    if ch.delta.content:
                        text.append(ch.delta.content)
                    if ch.finish_reason:
                        finish = ch.finish_reason
            got = "".join(text)
            with lock:
                if finish is None or got != ref[p]:
                    bad.append({"prompt": p, "got": got, "want": ref[p], "finish": finish})
                else:
                    done[0] += 1
        except Exception as e:  # noqa: BLE001 - every failure is reported
            with lock:
                bad.append({"prompt": p, "error": repr(e)})


t0 = time.monotonic()
threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.monotonic() - t0
print(json.dumps({"completed": done[0], "bad": len(bad), "examples": bad[:3], "seconds": round(elapsed, 1)}))
if bad or done[0] < clients:
    sys.exit(1)
