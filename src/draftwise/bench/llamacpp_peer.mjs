// llama.cpp as a bench peer, through node-llama-cpp's prebuilt CPU binaries.
//
//   node llamacpp_peer.mjs MODEL.gguf THREADS CONTEXT
//
// Reads one JSON request per line on stdin:
//   {"tokens": [...], "max_new_tokens": N, "eos": [...], "lookup": false}
// and answers one JSON line per request:
//   {"tokens": [...], "seconds": S, "validated": V, "refuted": R}
// Prompts arrive as token ids (draftwise applies the chat template and tokenizes), so both sides
// see the same tokens. Decoding is greedy (temperature 0). "lookup" uses node-llama-cpp's
// InputLookupTokenPredictor, llama.cpp's prompt-lookup speculation. The first line written is
// {"ready": true, ...} once the model is loaded.

import { createInterface } from "node:readline";
import { getLlama, InputLookupTokenPredictor } from "node-llama-cpp";

const [modelPath, threadsText, contextText] = process.argv.slice(2);
const threads = Number(threadsText || "2");
const contextSize = Number(contextText || "2048");

const llama = await getLlama({ gpu: false, build: "never", maxThreads: threads, logLevel: "error" });
const model = await llama.loadModel({ modelPath, gpuLayers: 0 });

async function makeSequence(lookup) {
  const context = await model.createContext({ contextSize, threads, sequences: 1 });
  const options = lookup ? { tokenPredictor: new InputLookupTokenPredictor() } : {};
  return context.getSequence(options);
}

const sequences = { plain: await makeSequence(false), lookup: await makeSequence(true) };
process.stdout.write(JSON.stringify({ ready: true, build: llama.buildType, cpu: llama.cpuMathCores ?? null }) + "\n");

async function generate(request) {
  const sequence = sequences[request.lookup ? "lookup" : "plain"];
  await sequence.clearHistory();
  const before = sequence.tokenPredictions ?? { validated: 0, refuted: 0 };
  const eos = new Set(request.eos ?? []);
  const out = [];
  const start = process.hrtime.bigint();
  for await (const token of sequence.evaluate(request.tokens, { temperature: 0, yieldEogToken: true })) {
    out.push(token);
    if (eos.has(token) || model.isEogToken(token) || out.length >= request.max_new_tokens) break;
  }
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  const after = sequence.tokenPredictions ?? { validated: 0, refuted: 0 };
  return {
    tokens: out,
    seconds,
    validated: after.validated - before.validated,
    refuted: after.refuted - before.refuted,
  };
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  try {
    process.stdout.write(JSON.stringify(await generate(JSON.parse(line))) + "\n");
  } catch (error) {
    process.stdout.write(JSON.stringify({ error: String(error && error.stack || error) }) + "\n");
  }
}
await model.dispose();
await llama.dispose();
