/**
 * `obfuscatune bench finetune`: step time of local, sealed and paper (kappa 1) fine-tuning
 * on a random-init preset, each mode in its own child process (so each peak RSS is its own).
 */
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { getPreset, LLAMA_PRESETS } from '../model/config.js';
import { Llama } from '../model/llama.js';
import { GPT2 } from '../model/gpt2.js';
import { Rng } from '../tensor/rng.js';
import { buildSession } from '../train/session.js';
import { AdamW, SGD, sumSquares } from '../train/optim.js';
import type { TrainMode, Method } from '../enclave/split_model.js';
import type { AcceleratorLink } from '../protocol/link.js';
import type { AcceleratorWeights } from '../protocol/linears.js';
import { median, peakRssMb } from './train_step.js';
import { mixingLabel, type MixingConfig, type MixingStats } from '../enclave/mixing.js';

export interface FinetuneBenchRow {
  mode: TrainMode;
  kappa?: string;
  step_ms_median: number;
  step_ms_min: number;
  peak_rss_mb: number;
  /** share of the step spent in the enclave's integrity checks */
  integrity_share: number;
  boundary_messages_per_step: number;
  transport: string;
  /** where Call frames went: in-process, tensor-channel or grpc */
  data_path: string;
  /** networked rows: step time over the same mode's in-process step (median of interleaved pairs) */
  vs_in_process?: number;
  /** measured in one process with the in-process twin, steps interleaved (see benchFinetunePaired) */
  paired?: boolean;
  /** --interleaved: step time over local's in the same round (median over rounds) */
  vs_local?: number;
  /** --token-mixing on: this row's token mixing */
  token_mixing?: 'off' | 'on';
  /** --token-mixing on, the mixed row: step time over the unmixed sealed step beside it (median of pairs) */
  vs_unmixed?: number;
  /** share of the step spent drawing, mixing and unmixing (the enclave's side of the defence) */
  mixing_share?: number;
  /** the mixed row: the accelerator's rows and FLOPs over those of the real rows, and the enclave's mixing FLOPs over the accelerator's real ones */
  rows_vs_real?: number;
  flops_vs_real?: number;
  mixing_flops_vs_real?: number;
}

export interface FinetuneBenchResult {
  model: string;
  method: Method;
  batch: number;
  seq: number;
  steps: number;
  transport: string;
  /** networked runs: whether Call frames used the tensor channel */
  tensor_channel?: boolean;
  /** the modes ran in one process, steps in rounds (benchFinetuneInterleaved) */
  interleaved?: boolean;
  /** sealed with and without token mixing, paired in one process (benchFinetuneMixing) */
  token_mixing?: MixingConfig;
  rows: FinetuneBenchRow[];
}

type BenchLinkFactory = (acc: AcceleratorWeights) => Promise<AcceleratorLink & { dataPath?: string }>;

interface BenchOneOptions { model: string; method: Method; mode: TrainMode; batch: number; seq: number; steps: number; rank: number; transport: string; link?: BenchLinkFactory; mixing?: MixingConfig | null }

interface StepRunner {
  step(): Promise<{ ms: number; integrityMs: number; messages: number; mixingMs: number }>;
  mixingStats(): MixingStats | null;
  dataPath(): string;
  close(): Promise<void>;
}

/** A fine-tuning session of one mode on a random-init preset, stepped on demand. */
function stepRunner(o: BenchOneOptions, linkFactoryIn?: BenchLinkFactory): StepRunner {
  const llama = LLAMA_PRESETS[o.model];
  const config = llama ?? getPreset(o.model);
  if (o.seq > config.n_ctx) throw new Error(`--seq ${o.seq} exceeds ${o.model}'s context of ${config.n_ctx}`);
  const base = llama ? Llama.random({ ...llama }, 1).weights() : GPT2.random(config, 1).weights();
  let link: (AcceleratorLink & { dataPath?: string }) | undefined;
  // the network link needs the (obfuscated) weights on the remote accelerator first
  const linkFactory = linkFactoryIn && ((acc: AcceleratorWeights) => ({
    call: async (...args: Parameters<AcceleratorLink['call']>) => {
      link ??= await linkFactoryIn(acc);
      return link.call(...args);
    },
    releaseScratch: () => link?.releaseScratch?.(),
    close: async () => link?.close?.(),
    get stats() {
      return (link as { stats?: { messages: number } } | undefined)?.stats ?? { messages: 0 };
    },
  }));
  const s = buildSession(base, {
    mode: o.mode, method: o.method, task: 'lm', kappa: '1', padTokenId: 50256, seed: 1, maskSeed: 1,
    lora: { rank: o.rank, alpha: 2 * o.rank, dropout: 0, targets: ['q', 'v'] }, link: linkFactory, mixing: o.mixing,
  });
  const m = s.model;
  const rng = new Rng(3);
  const n = o.batch * o.seq;
  const tokens = Int32Array.from({ length: n }, () => rng.int(config.vocab_size));
  const targets = Int32Array.from({ length: n }, () => rng.int(config.vocab_size));
  const trained = m.adapters ?? m; // what the enclave's optimiser steps: the adapters (lora), or its own tensors
  const encOpt = m.adapters ? new AdamW(trained.params.length) : new SGD(trained.params.length, { momentum: 0.9 });
  const sent = () => (s.link as { stats?: { messages: number } }).stats?.messages ?? 0;
  return {
    async step() {
      const before = m.integrity?.ms ?? 0;
      const mixBefore = m.mixingStats?.ms ?? 0;
      const msgs = sent();
      const t0 = performance.now();
      m.grads.fill(0);
      m.adapters?.grads.fill(0);
      await m.forward(tokens, o.batch, o.seq, targets, true);
      await m.backward();
      sumSquares(m.grads, ...(m.adapters ? [m.adapters.grads] : []));
      await m.acceleratorGradSq();
      encOpt.step(trained.params, trained.grads, 1e-4);
      await m.acceleratorUpdate(1e-4, 0.9, 1);
      return { ms: performance.now() - t0, integrityMs: (m.integrity?.ms ?? 0) - before, messages: sent() - msgs, mixingMs: (m.mixingStats?.ms ?? 0) - mixBefore };
    },
    mixingStats: () => m.mixingStats,
    dataPath: () => (linkFactoryIn ? link?.dataPath ?? 'grpc' : 'in-process'),
    close: async () => { await s.link.close?.(); },
  };
}

type StepTimes = Awaited<ReturnType<StepRunner['step']>>;

function rowOf(o: BenchOneOptions, transport: string, dataPath: string, steps: StepTimes[]): FinetuneBenchRow {
  const times = steps.map((x) => x.ms);
  return {
    mode: o.mode, ...(o.mode === 'paper' ? { kappa: '1' } : {}), step_ms_median: median(times), step_ms_min: Math.min(...times),
    peak_rss_mb: peakRssMb(), integrity_share: steps.reduce((a, x) => a + x.integrityMs, 0) / times.reduce((a, b) => a + b, 0),
    boundary_messages_per_step: steps[steps.length - 1]?.messages ?? 0, transport, data_path: dataPath,
    ...(o.mixing !== undefined ? { token_mixing: o.mixing ? 'on' as const : 'off' as const, mixing_share: steps.reduce((a, x) => a + x.mixingMs, 0) / times.reduce((a, b) => a + b, 0) } : {}),
  };
}

/**
 * Steps every runner `steps` times in rounds, after `warm` warm-up rounds: a slow spell of a
 * shared machine hits every runner of a round. With `rotate`, the order rotates each round.
 */
async function rounds(runners: StepRunner[], steps: number, o: { warm?: number; rotate?: boolean; onRound?: (i: number) => void } = {}): Promise<StepTimes[][]> {
  for (let w = 0; w < (o.warm ?? 1); w++) for (const r of runners) await r.step();
  const out = runners.map(() => [] as StepTimes[]);
  for (let i = 0; i < steps; i++) {
    for (let j = 0; j < runners.length; j++) {
      const k = o.rotate ? (i + j) % runners.length : j;
      out[k].push(await runners[k].step());
    }
    o.onRound?.(i + 1);
  }
  for (const r of runners) await r.close();
  return out;
}

/** The median over rounds of a runner's step time over another's in the same round. */
const ratio = (a: StepTimes[], b: StepTimes[]) => median(a.map((x, i) => x.ms / b[i].ms));

const resultOf = (o: Pick<FinetuneBenchResult, 'model' | 'method' | 'batch' | 'seq' | 'steps'>, transport: string) =>
  ({ model: o.model, method: o.method, batch: o.batch, seq: o.seq, steps: o.steps, transport });

/**
 * Sealed fine-tuning without and with token mixing in this process, steps paired (the order
 * alternating) after one warm-up step each: the mixed row's `vs_unmixed` is the median of
 * the per-pair ratios, robust to a busy machine.
 */
export async function benchFinetuneMixing(o: Omit<BenchOneOptions, 'mode' | 'link' | 'mixing'> & { mixing: MixingConfig; onProgress?: (i: number, n: number, label: string) => void }): Promise<FinetuneBenchResult> {
  const opts = [null, o.mixing].map((mixing) => ({ ...o, mode: 'sealed' as const, mixing, transport: 'in-process' }));
  const runners = opts.map((x) => stepRunner(x));
  const steps = await rounds(runners, o.steps, { rotate: true, onRound: (i) => o.onProgress?.(i, o.steps, `pair ${i}`) });
  const rows = opts.map((x, k) => rowOf(x, 'in-process', 'in-process', steps[k]));
  rows[1].vs_unmixed = ratio(steps[1], steps[0]);
  const m = runners[1].mixingStats();
  if (m) Object.assign(rows[1], { rows_vs_real: m.rowsSent / m.rowsReal, flops_vs_real: m.flopsSent / m.flopsReal, mixing_flops_vs_real: m.mixFlops / m.flopsReal });
  return { ...resultOf(o, 'in-process'), token_mixing: o.mixing, rows };
}

/** One mode, in this process (one warm-up step, then `steps` timed ones). */
export async function benchFinetuneOne(o: BenchOneOptions): Promise<FinetuneBenchRow> {
  const r = stepRunner(o, o.link);
  const [steps] = await rounds([r], o.steps);
  return rowOf(o, o.transport, r.dataPath(), steps);
}

/**
 * One split mode both in-process and over the network, in this process, with their steps
 * interleaved (in-process, networked, in-process, ...): a slow spell of a shared machine
 * then hits both sides of each pair, and `vs_in_process` is the median of the per-pair
 * ratios. Two warm-up steps each. Both rows report this process's peak RSS (both sessions).
 */
export async function benchFinetunePaired(o: BenchOneOptions & { link: BenchLinkFactory }): Promise<FinetuneBenchRow[]> {
  const runners = [stepRunner({ ...o, transport: 'in-process' }), stepRunner(o, o.link)];
  const [a, b] = await rounds(runners, o.steps, { warm: 2 });
  const rows = [rowOf(o, 'in-process', 'in-process', a), rowOf(o, o.transport, runners[1].dataPath(), b)];
  rows[1].vs_in_process = ratio(b, a);
  rows[0].paired = rows[1].paired = true;
  return rows;
}

/**
 * Local, sealed and paper in this process, stepped in rounds (the order rotating each
 * round) after one warm-up step each: a slow spell of a shared machine hits every mode of a
 * round, and each split row's `vs_local` is the median over rounds of its step over local's.
 * Peak RSS is this process's (all three sessions).
 */
export async function benchFinetuneInterleaved(o: Omit<BenchOneOptions, 'mode' | 'link'> & { onProgress?: (i: number, n: number, label: string) => void }): Promise<FinetuneBenchResult> {
  const opts = (['local', 'sealed', 'paper'] as const).map((mode) => ({ ...o, mode, transport: 'in-process' }));
  const steps = await rounds(opts.map((x) => stepRunner(x)), o.steps, { rotate: true, onRound: (i) => o.onProgress?.(i, o.steps, `round ${i}`) });
  const rows = opts.map((x, k) => rowOf(x, 'in-process', 'in-process', steps[k]));
  for (let k = 1; k < rows.length; k++) rows[k].vs_local = ratio(steps[k], steps[0]);
  return { ...resultOf(o, 'in-process'), interleaved: true, rows };
}

/**
 * Local, sealed and paper, each in a child process, in one run. With a network transport
 * each split mode runs in one child both in-process and over the network, steps interleaved,
 * so each networked row carries its ratio to the in-process twin measured beside it.
 */
export function benchFinetune(o: { model: string; method: Method; batch: number; seq: number; steps: number; rank: number; transport: string; tensorChannel?: boolean; onProgress?: (i: number, n: number, label: string) => void }): FinetuneBenchResult {
  const bin = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../bin/obfuscatune.js');
  const networked = o.transport !== 'in-process';
  const runs: { mode: TrainMode; transport: string }[] = [{ mode: 'local', transport: 'in-process' }, { mode: 'sealed', transport: o.transport }, { mode: 'paper', transport: o.transport }];
  const rows: FinetuneBenchRow[] = [];
  runs.forEach(({ mode, transport }, i) => {
    o.onProgress?.(i, runs.length, `${mode} ${transport}${transport !== 'in-process' ? ' + in-process' : ''}`);
    const r = spawnSync(process.execPath, [bin, 'bench', 'finetune-one', '--json', '--model', o.model, '--method', o.method, '--mode', mode,
      '--batch', String(o.batch), '--seq', String(o.seq), '--steps', String(o.steps), '--rank', String(o.rank), '--transport', transport,
      ...(o.tensorChannel === false ? ['--no-tensor-channel'] : [])], { encoding: 'utf8', env: { ...process.env, OBFUSCATUNE_NO_PROGRESS: '1' } });
    if (r.status !== 0) throw new Error(`bench of mode ${mode} (${transport}) failed: ${r.stderr.trim().split('\n').slice(-3).join(' | ')}`);
    const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as FinetuneBenchRow | FinetuneBenchRow[];
    rows.push(...(Array.isArray(out) ? out : [out]));
  });
  o.onProgress?.(runs.length, runs.length, 'done');
  return { ...resultOf(o, o.transport), ...(networked ? { tensor_channel: o.tensorChannel !== false } : {}), rows };
}

export function formatFinetuneBench(r: FinetuneBenchResult): string {
  if (r.token_mixing) {
    const m = r.token_mixing;
    const head = `${r.model}, ${r.method}, batch ${r.batch} x seq ${r.seq}, sealed without and with token mixing (${mixingLabel(m)}), median of ${r.steps} paired steps`;
    const x1 = (v: number | undefined) => (v !== undefined ? `${v.toFixed(2)}x` : '-');
    return [head, 'token mixing  step ms  vs unmixed  mixing share  msgs/step  acc. rows  acc. FLOPs  mixing FLOPs', ...r.rows.map((x) => `${(x.token_mixing ?? 'off').padEnd(12)} ${x.step_ms_median.toFixed(0).padStart(8)}  ${x1(x.vs_unmixed).padStart(10)}  ${(100 * (x.mixing_share ?? 0)).toFixed(1).padStart(11)}%  ${String(x.boundary_messages_per_step).padStart(9)}  ${x1(x.rows_vs_real).padStart(9)}  ${x1(x.flops_vs_real).padStart(10)}  ${(x.mixing_flops_vs_real !== undefined ? `${(100 * x.mixing_flops_vs_real).toFixed(1)}%` : '-').padStart(12)}`)].join('\n');
  }
  const local = r.rows.find((x) => x.mode === 'local')!;
  const lines = [`${r.model}, ${r.method}, batch ${r.batch} x seq ${r.seq}, median of ${r.steps} steps${r.interleaved ? ' (modes interleaved in one process; vs local: median of per-round ratios)' : ''}`, 'mode      data path       step ms   vs local  vs in-process  integrity  msgs/step  peak RSS'];
  for (const x of r.rows) {
    const vs = x.vs_in_process !== undefined ? `${x.vs_in_process.toFixed(2)}x` : '-';
    const vsLocal = x.vs_local ?? x.step_ms_median / local.step_ms_median;
    lines.push(`${(x.mode + (x.kappa ? ` k${x.kappa}` : '')).padEnd(9)} ${(x.data_path ?? x.transport).padEnd(14)} ${x.step_ms_median.toFixed(0).padStart(8)}  ${vsLocal.toFixed(2).padStart(7)}x  ${vs.padStart(13)}  ${(100 * x.integrity_share).toFixed(1).padStart(8)}%  ${String(x.boundary_messages_per_step).padStart(9)}  ${x.peak_rss_mb.toFixed(0).padStart(6)} MB`);
  }
  return lines.join('\n');
}
