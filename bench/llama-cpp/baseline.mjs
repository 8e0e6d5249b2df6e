// llama.cpp CPU baseline for `cargo xtask bench inference` (and `--vs-llama-cpp`), through the
// prebuilt llama.cpp binaries of the npm package node-llama-cpp (pinned in package.json and
// package-lock.json beside this file; nothing is compiled).
//
// Setup (xtask does it on demand):  cd bench/llama-cpp && npm ci --omit=optional --ignore-scripts
// Run by hand:                      node baseline.mjs MODEL.gguf THREADS PROMPT_TOKENS GEN_TOKENS
// Prints one JSON line: {"backend", "prefill_tps", "decode_tps"}; prompt tokens are the same
// deterministic ids as inference-bench uses; decode is greedy (temperature 0).
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
const [modelPath, threadsS, promptS, genS] = process.argv.slice(2);
const threads = Number(threadsS), nPrompt = Number(promptS), nGen = Number(genS);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath, gpuLayers: 0});
const context = await model.createContext({contextSize: 512, batchSize: 512, threads});
const vocab = Number(process.env.VOCAB ?? 49152); // prompt ids must be < vocab (SmolLM2: 49152)
const prompt = Array.from({length: nPrompt}, (_, i) => 1 + Number((BigInt(i) * 2654435761n) % BigInt(vocab - 1)));
async function run() {
  const seq = context.getSequence();
  const t0 = performance.now();
  await seq.evaluateWithoutGeneratingNewTokens(prompt);
  const t1 = performance.now();
  let n = 0;
  const t2 = performance.now();
  for await (const tok of seq.evaluate([prompt[prompt.length - 1]], {temperature: 0})) {
    if (++n >= nGen) break;
  }
  const t3 = performance.now();
  seq.dispose();
  return {prefill_tps: nPrompt / ((t1 - t0) / 1000), decode_tps: nGen / ((t3 - t2) / 1000)};
}
await run(); // warm-up
const r = await run();
console.log(JSON.stringify({backend: `llama.cpp-${threads}t`, ...r}));
process.exit(0);
