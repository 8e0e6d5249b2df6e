// Greedy continuation by llama.cpp (node-llama-cpp, pinned beside this file) for the
// greedy-agreement check of `cargo xtask bench inference --agree`:
//   node greedy.mjs MODEL.gguf PROMPT GEN_TOKENS
// PROMPT is a comma-separated list of token ids (what inference-bench --greedy --prompt-text
// printed), or a count N for inference-bench's N deterministic ids; prints one JSON line
// {"tokens": [...]} with the GEN_TOKENS ids llama.cpp picks at temperature 0.
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
const [modelPath, promptS, genS] = process.argv.slice(2);
const nGen = Number(genS);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath, gpuLayers: 0});
const context = await model.createContext({contextSize: 512, batchSize: 512, threads: 1});
const vocab = Number(process.env.VOCAB ?? 49152);
const prompt = promptS.includes(",")
  ? promptS.split(",").map(Number)
  : Array.from({length: Number(promptS)}, (_, i) => 1 + Number((BigInt(i) * 2654435761n) % BigInt(vocab - 1)));
const seq = context.getSequence();
const tokens = [];
for await (const tok of seq.evaluate(prompt, {temperature: 0})) {
  tokens.push(Number(tok));
  if (tokens.length >= nGen) break;
}
console.log(JSON.stringify({tokens}));
process.exit(0);
