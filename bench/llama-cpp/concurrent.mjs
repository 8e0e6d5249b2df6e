// llama.cpp's side of the concurrency table of `cargo xtask bench inference --concurrency LIST
// --vs-llama-cpp`, through the prebuilt llama.cpp of node-llama-cpp (pinned beside this file):
//   node concurrent.mjs MODEL.gguf THREADS STREAMS PROMPT_IDS GEN_TOKENS
// STREAMS greedy (temperature 0) sequences of one context, all started at once. node-llama-cpp
// queues the tokens of every sequence that waits for an evaluation and decodes them together in
// one llama_decode batch (up to batchSize tokens), as llama-server's continuous batching does.
// Stream i's prompt is the same PROMPT_IDS ids as the Rust bench's stream i
// (`inference::bench::concurrency::stream_prompt`); a stream stops after GEN_TOKENS tokens or at
// an end-of-generation token (counted, as ours are). A warm-up run (every stream, 2 tokens)
// comes first. Prints one JSON line with the fields of our `ConcurrencyRow`: model, streams,
// tokens, wall_s, tps (tokens / wall_s, prefill included), ttft_p50_ms, itl_p50_ms, itl_p99_ms;
// plus threads, batch_size and context_size (cells of the context, all sequences).
// VOCAB overrides the vocabulary size the prompt ids are drawn from (default: the model's).
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, threadsS, streamsS, promptS, genS] = process.argv.slice(2);
const threads = Number(threadsS), streams = Number(streamsS), nPrompt = Number(promptS), nGen = Number(genS);
for (const [name, v] of [["THREADS", threads], ["STREAMS", streams], ["PROMPT_IDS", nPrompt], ["GEN_TOKENS", nGen]]) {
  if (!Number.isInteger(v) || v < 1) {
    console.error(`usage: node concurrent.mjs MODEL.gguf THREADS STREAMS PROMPT_IDS GEN_TOKENS (${name} must be an integer >= 1)`);
    process.exit(2);
  }
}

const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath, gpuLayers: 0});
const vocab = Number(process.env.VOCAB ?? model.fileInfo.metadata?.tokenizer?.ggml?.tokens?.length ?? 49152);

// `contextSize` is per sequence: the context holds streams x contextSize cells (rounded up by
// llama.cpp). batchSize 512 tokens per llama_decode, llama.cpp's default.
const context = await model.createContext({
  sequences: streams,
  contextSize: nPrompt + nGen + 1,
  batchSize: 512,
  threads,
});
const seqs = Array.from({length: streams}, () => context.getSequence());

// Stream i's prompt ids: 1 + (k * 2654435761 + i * 7919) mod (vocab - 1), as stream_prompt().
function streamPrompt(i, n) {
  const v = BigInt(Math.max(vocab, 2) - 1);
  return Array.from({length: n}, (_, k) => 1 + Number((BigInt(k) * 2654435761n + BigInt(i) * 7919n) % v));
}

// p-th percentile (0..100), linear interpolation between the two nearest ranks (as ours).
function percentile(values, p) {
  const s = values.filter((x) => !Number.isNaN(x)).sort((a, b) => a - b);
  if (s.length === 0) return null;
  const r = (Math.min(Math.max(p, 0), 100) / 100) * (s.length - 1);
  const lo = Math.floor(r), hi = Math.ceil(r);
  return s[lo] + (s[hi] - s[lo]) * (r - lo);
}

// All streams at once; per stream the times (ms since the start) of its generated tokens.
async function run(maxTokens) {
  await Promise.all(seqs.map((s) => s.clearHistory()));
  const t0 = performance.now();
  const times = await Promise.all(seqs.map(async (seq, i) => {
    const t = [];
    for await (const tok of seq.evaluate(streamPrompt(i, nPrompt), {temperature: 0, yieldEogToken: true})) {
      t.push(performance.now() - t0);
      if (t.length >= maxTokens || model.isEogToken(tok)) break;
    }
    return t;
  }));
  return times;
}

await run(2); // warm-up
const times = await run(nGen);
const tokens = times.reduce((a, t) => a + t.length, 0);
const wallMs = Math.max(0, ...times.map((t) => t.at(-1) ?? 0));
const firsts = times.filter((t) => t.length > 0).map((t) => t[0]);
const gaps = times.flatMap((t) => t.slice(1).map((x, k) => x - t[k]));
console.log(JSON.stringify({
  model: "llama.cpp",
  streams,
  tokens,
  wall_s: wallMs / 1000,
  tps: tokens / Math.max(wallMs / 1000, 1e-9),
  ttft_p50_ms: percentile(firsts, 50),
  itl_p50_ms: percentile(gaps, 50),
  itl_p99_ms: percentile(gaps, 99),
  threads,
  batch_size: context.batchSize,
  context_size: context.contextSize * streams,
}));
process.exit(0);
