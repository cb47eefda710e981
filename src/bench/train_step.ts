/** `obfuscatune bench train-step`: median time of one full training step (forward, backward, optimiser). */
import os from 'node:os';
import { getPreset } from '../model/config.js';
import { GPT2 } from '../model/gpt2.js';
import { Rng } from '../tensor/rng.js';
import { backendName, nativeInfo } from '../tensor/gemm.js';
import { makeOptimizer } from '../train/lm.js';
import { sumSquares, clipScale } from '../train/optim.js';

export interface TrainStepBenchResult {
  model: string;
  params: number;
  batch: number;
  seq: number;
  steps: number;
  step_ms_median: number;
  step_ms_min: number;
  /** Median split of one step into its phases (ms). */
  phases_ms: { forward: number; backward: number; optimizer: number };
  peak_rss_mb: number;
  backend: string;
  threads: number;
  optimizer: string;
}

/** This process's peak resident memory in MB, to 0.1 MB. */
export function peakRssMb(): number {
  return Math.round((process.resourceUsage().maxRSS / 1024) * 10) / 10;
}

/** The median (the mean of the two middle values of an even count). */
export function median(a: number[]): number {
  const s = [...a].sort((x, y) => x - y);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

export async function benchTrainStep(opts: { model: string; batch: number; seq: number; steps: number; optimizer?: 'adamw' | 'sgd'; onProgress?: (i: number, n: number) => void }): Promise<TrainStepBenchResult> {
  const config = getPreset(opts.model);
  const { batch: B, seq: T } = opts;
  if (T > config.n_ctx) throw new Error(`--seq ${T} exceeds ${opts.model}'s context of ${config.n_ctx}`);
  const model = GPT2.random(config, 1);
  const rng = new Rng(2);
  const [inputs, targets] = [0, 1].map(() => Int32Array.from({ length: B * T }, () => rng.int(config.vocab_size)));
  const kind = opts.optimizer ?? 'adamw';
  const opt = makeOptimizer(model, kind, { weightDecay: 0.01 });
  model.ensureGrads();
  // per timed step: the whole step, forward, backward, optimiser (ms)
  const phases: number[][] = [];
  const total = opts.steps + 1; // first step is a warm-up
  for (let s = 0; s < total; s++) {
    const t0 = performance.now();
    model.zeroGrad();
    await model.forward(inputs, B, T, targets);
    const t1 = performance.now();
    await model.backward();
    const t2 = performance.now();
    const norm = Math.sqrt(sumSquares(model.grads!));
    opt.step(model.params, model.grads!, 1e-4, clipScale(norm, 1.0));
    const t3 = performance.now();
    if (s > 0) phases.push([t3 - t0, t1 - t0, t2 - t1, t3 - t2]);
    opts.onProgress?.(s + 1, total);
  }
  const [times, fw, bw, op] = [0, 1, 2, 3].map((j) => phases.map((p) => p[j]));
  const info = nativeInfo();
  return {
    model: opts.model, params: model.layout.total, batch: B, seq: T, steps: opts.steps,
    step_ms_median: median(times), step_ms_min: Math.min(...times),
    phases_ms: { forward: median(fw), backward: median(bw), optimizer: median(op) }, peak_rss_mb: peakRssMb(),
    backend: backendName(), threads: backendName() === 'native' && info ? info.threads : 1, optimizer: kind,
  };
}

/** The machine a benchmark runs on: CPU model, the kernels' instruction set and threads. */
export function machineLabel(): string {
  const info = nativeInfo();
  const kernels = backendName() === 'native' && info ? `native ${info.isa} kernels, ${info.threads} threads` : 'TypeScript kernels';
  return `${os.cpus()[0]?.model.trim() ?? 'unknown CPU'}, ${kernels}`;
}

export function formatTrainStep(r: TrainStepBenchResult): string {
  return [
    `model ${r.model} (${(r.params / 1e6).toFixed(1)}M params), batch ${r.batch} x seq ${r.seq}, ${r.optimizer}, backend ${r.backend} (${r.threads} threads)`,
    `step: median ${r.step_ms_median.toFixed(1)} ms, min ${r.step_ms_min.toFixed(1)} ms over ${r.steps} steps`,
    `  forward ${r.phases_ms.forward.toFixed(1)} ms, backward ${r.phases_ms.backward.toFixed(1)} ms, optimizer+clip ${r.phases_ms.optimizer.toFixed(1)} ms`,
    `peak RSS ${r.peak_rss_mb.toFixed(0)} MB`,
  ].join('\n');
}
