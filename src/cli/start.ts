/**
 * `npm start`: the main job on the bundled model and data. Trains a small GPT-2 on the
 * bundled Austen text with the project's own engine, evaluates it on held-out chapters
 * before and after, and prints a generated sample. Writes summary.json into the run dir.
 */
import { readFileSync, mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { getPreset } from '../model/config.js';
import { GPT2 } from '../model/gpt2.js';
import { saveCheckpoint } from '../model/checkpoint.js';
import { generate } from '../model/generate.js';
import { gpt2Tokenizer } from '../model/tokenizer.js';
import { backendName } from '../tensor/gemm.js';
import { trainLM, evaluateLM } from '../train/lm.js';
import { progressBar } from './progress.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

export async function runStart(o: { steps?: number; out: string }): Promise<void> {
  const steps = o.steps ?? 150;
  const dataDir = path.join(ROOT, 'data', 'sample');
  const tok = gpt2Tokenizer;
  const train = Int32Array.from(tok.encode(readFileSync(path.join(dataDir, 'austen-train.txt'), 'utf8')));
  const valid = Int32Array.from(tok.encode(readFileSync(path.join(dataDir, 'austen-valid.txt'), 'utf8')));
  const config = getPreset('gpt2-mini');
  const model = GPT2.random(config, 1);
  console.log(`obfuscatune: local training of a ${(model.numParams() / 1e6).toFixed(1)}M-parameter GPT-2 (${config.n_layer} layers, d=${config.n_embd}) on ${train.length.toLocaleString()} tokens of Pride and Prejudice; backend ${backendName()}`);
  const seq = 64;
  const batch = 8;
  const before = evaluateLM(model, valid, seq, batch, 8);
  const bar = progressBar(steps, 'train', 'loss {loss} | {tps} tok/s');
  let tokens = 0;
  let ms = 0;
  const t0 = performance.now();
  const losses = trainLM(model, train, {
    steps, batch, seq, lr: 2e-3, warmup: 10, optimizer: 'adamw', weightDecay: 0.0, clip: 1.0, seed: 1,
    onStep: (s) => {
      tokens += s.tokens;
      ms += s.ms;
      bar.update(s.step + 1, { loss: s.loss.toFixed(3), tps: Math.round((tokens / ms) * 1000) });
    },
  });
  bar.stop();
  const seconds = (performance.now() - t0) / 1000;
  const after = evaluateLM(model, valid, seq, batch, 8);
  const prompt = 'It is a truth universally acknowledged';
  const sample = tok.decode(generate(model, tok.encode(prompt), { maxNewTokens: 30, temperature: 0.8, topK: 40, seed: 1, stopToken: tok.eotId }));
  console.log('');
  console.log(`held-out loss      ${before.loss.toFixed(3)} -> ${after.loss.toFixed(3)}   (perplexity ${before.perplexity.toFixed(0)} -> ${after.perplexity.toFixed(1)})`);
  console.log(`training           ${steps} steps in ${seconds.toFixed(1)} s (${Math.round(tokens / seconds)} tokens/s)`);
  console.log(`sample             ${JSON.stringify(prompt + sample)}`);
  mkdirSync(o.out, { recursive: true });
  const summary = {
    task: 'lm', method: 'local', steps, seconds,
    eval_before: { loss: before.loss, perplexity: before.perplexity },
    eval: { loss: after.loss, perplexity: after.perplexity },
    first_loss: losses[0], last_loss: losses[losses.length - 1], sample: prompt + sample,
  };
  writeFileSync(path.join(o.out, 'summary.json'), JSON.stringify(summary, null, 2) + '\n');
  saveCheckpoint(path.join(o.out, 'model'), model.weights());
  console.log(`run directory      ${o.out}`);
}
