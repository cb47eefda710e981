/**
 * Plain (local) language-model training on a token stream: random windows, AdamW or SGD,
 * warmup + cosine schedule, global-norm clipping. The confidential trainers reuse the
 * schedule, batching and metrics from here.
 */
import type { GPT2 } from '../model/gpt2.js';
import type { Llama } from '../model/llama.js';

/** A plain model of either family. */
type PlainLM = GPT2 | Llama;
import { Rng } from '../tensor/rng.js';
import { AdamW, SGD, sumSquares, clipScale, cosineSchedule, gpt2DecayMask, type Optimizer } from './optim.js';

export interface LMTrainOptions {
  steps: number;
  batch: number;
  seq: number;
  lr: number;
  warmup?: number;
  optimizer?: 'adamw' | 'sgd';
  weightDecay?: number;
  momentum?: number;
  clip?: number;
  seed?: number;
  onStep?: (info: StepInfo) => void | Promise<void>;
}

export interface StepInfo {
  step: number;
  loss: number;
  lr: number;
  gradNorm: number;
  ms: number;
  tokens: number;
}

/** Samples B windows of T+1 tokens from a stream: inputs [B,T] and next-token targets [B,T]. */
export function sampleWindows(stream: Int32Array, B: number, T: number, rng: Rng): { inputs: Int32Array; targets: Int32Array } {
  if (stream.length < T + 1) throw new Error(`the token stream has ${stream.length} tokens, fewer than seq+1 = ${T + 1}`);
  const inputs = new Int32Array(B * T);
  const targets = new Int32Array(B * T);
  for (let b = 0; b < B; b++) {
    const start = rng.int(stream.length - T);
    inputs.set(stream.subarray(start, start + T), b * T);
    targets.set(stream.subarray(start + 1, start + T + 1), b * T);
  }
  return { inputs, targets };
}

export function makeOptimizer(model: PlainLM, kind: 'adamw' | 'sgd', opts: { weightDecay?: number; momentum?: number }): Optimizer {
  if (kind === 'adamw') return new AdamW(model.layout.total, { weightDecay: opts.weightDecay ?? 0 }, gpt2DecayMask(model.layout));
  return new SGD(model.layout.total, { momentum: opts.momentum ?? 0.9, weightDecay: opts.weightDecay ?? 0 });
}

/** Trains in place; returns the per-step losses. Stops with an error on a non-finite loss. */
export async function trainLM(model: PlainLM, stream: Int32Array, o: LMTrainOptions): Promise<number[]> {
  const rng = new Rng(o.seed ?? 0);
  const opt = makeOptimizer(model, o.optimizer ?? 'adamw', o);
  model.ensureGrads();
  const losses: number[] = [];
  for (let step = 0; step < o.steps; step++) {
    const t0 = performance.now();
    const { inputs, targets } = sampleWindows(stream, o.batch, o.seq, rng);
    model.zeroGrad();
    const { loss } = await model.forward(inputs, o.batch, o.seq, targets);
    if (loss === null || !Number.isFinite(loss)) throw new Error(`loss became ${loss} at step ${step}`);
    await model.backward();
    const gradNorm = Math.sqrt(sumSquares(model.grads!));
    if (!Number.isFinite(gradNorm)) throw new Error(`gradient norm became ${gradNorm} at step ${step}`);
    const lr = cosineSchedule(step, o.steps, o.lr, o.warmup ?? 0);
    opt.step(model.params, model.grads!, lr, clipScale(gradNorm, o.clip ?? 1.0));
    losses.push(loss);
    await o.onStep?.({ step, loss, lr, gradNorm, ms: performance.now() - t0, tokens: o.batch * o.seq });
  }
  return losses;
}

interface WindowBatch { w: number; B: number; inputs: Int32Array; targets: Int32Array }

/** Consecutive windows of T tokens, `batch` at a time (at most `maxBatches`): from window w, inputs [B,T], targets [B,T]. */
export function* windowBatches(stream: Int32Array, T: number, batch: number, maxBatches = Infinity): Generator<WindowBatch> {
  const windows = Math.floor((stream.length - 1) / T);
  for (let w = 0, n = 0; w < windows && n < maxBatches; w += batch, n++) {
    const B = Math.min(batch, windows - w);
    yield { w, B, inputs: stream.slice(w * T, (w + B) * T), targets: stream.slice(w * T + 1, (w + B) * T + 1) };
  }
}

/** Mean next-token loss over consecutive windows of a stream (no gradients). */
export async function evaluateLM(model: PlainLM, stream: Int32Array, seq: number, batch: number, maxBatches = Infinity, onBatch?: (done: number, total: number) => void): Promise<{ loss: number; perplexity: number; tokens: number }> {
  let total = 0;
  let count = 0;
  let batches = 0;
  const all = Math.min(maxBatches, Math.ceil(Math.floor((stream.length - 1) / seq) / batch));
  for (const { B, inputs, targets } of windowBatches(stream, seq, batch, maxBatches)) {
    const { loss } = await model.forward(inputs, B, seq, targets, false);
    total += (loss ?? 0) * B * seq;
    count += B * seq;
    onBatch?.(++batches, all);
  }
  const loss = count > 0 ? total / count : NaN;
  return { loss, perplexity: Math.exp(loss), tokens: count };
}
