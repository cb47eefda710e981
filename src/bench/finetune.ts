/**
 * `obfuscatune bench finetune`: step time of local, sealed and paper (kappa 1) fine-tuning
 * on a random-init preset, each mode in its own child process (so each peak RSS is its own).
 */
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { getPreset } from '../model/config.js';
import { GPT2 } from '../model/gpt2.js';
import { Rng } from '../tensor/rng.js';
import { buildSession } from '../train/session.js';
import { AdamW, SGD, sumSquares } from '../train/optim.js';
import type { TrainMode, Method } from '../split/train_model.js';
import type { AcceleratorLink } from '../split/link.js';
import type { AcceleratorWeights } from '../obfuscate/transform.js';
import { peakRssMb } from './train_step.js';

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
  /** networked rows: step time over the same mode's in-process step, measured in the same run */
  vs_in_process?: number;
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
  rows: FinetuneBenchRow[];
}

function median(a: number[]): number {
  const s = [...a].sort((x, y) => x - y);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** One mode, in this process. */
export async function benchFinetuneOne(o: { model: string; method: Method; mode: TrainMode; batch: number; seq: number; steps: number; rank: number; transport: string; link?: (acc: AcceleratorWeights) => Promise<AcceleratorLink & { dataPath?: string }> }): Promise<FinetuneBenchRow> {
  const config = getPreset(o.model);
  if (o.seq > config.n_ctx) throw new Error(`--seq ${o.seq} exceeds ${o.model}'s context of ${config.n_ctx}`);
  const base = GPT2.random(config, 1).weights();
  let link: (AcceleratorLink & { dataPath?: string }) | undefined;
  let linkFactory: ((acc: AcceleratorWeights) => AcceleratorLink) | undefined;
  if (o.link) {
    // the network link needs the (obfuscated) weights on the remote accelerator first
    linkFactory = (acc) => {
      const lazy = {
        call: async (req: Parameters<AcceleratorLink['call']>[0]) => {
          link ??= await o.link!(acc);
          return link.call(req);
        },
        close: async () => link?.close?.(),
        get stats() {
          return (link as { stats?: { messages: number } } | undefined)?.stats ?? { messages: 0 };
        },
      };
      return lazy;
    };
  }
  const s = buildSession(base, {
    mode: o.mode, method: o.method, task: 'lm', kappa: '1', padTokenId: 50256, seed: 1, maskSeed: 1,
    lora: { rank: o.rank, alpha: 2 * o.rank, dropout: 0, targets: ['q', 'v'] }, link: linkFactory,
  });
  const m = s.model;
  const rng = new Rng(3);
  const n = o.batch * o.seq;
  const tokens = Int32Array.from({ length: n }, () => rng.int(config.vocab_size));
  const targets = Int32Array.from({ length: n }, () => rng.int(config.vocab_size));
  const encOpt = o.method === 'lora' ? new AdamW(m.adapters!.params.length) : new SGD(m.params.length, { momentum: 0.9 });
  const times: number[] = [];
  let integrityMs = 0;
  let messages = 0;
  const sent = () => (s.link as { stats?: { messages: number } }).stats?.messages ?? 0;
  for (let step = 0; step <= o.steps; step++) {
    const before = m.integrity?.ms ?? 0;
    const msgs = sent();
    const t0 = performance.now();
    m.grads.fill(0);
    m.adapters?.grads.fill(0);
    await m.forward(tokens, o.batch, o.seq, targets, true);
    await m.backward();
    sumSquares(m.grads, ...(m.adapters ? [m.adapters.grads] : []));
    await m.acceleratorGradSq();
    if (m.adapters) encOpt.step(m.adapters.params, m.adapters.grads, 1e-4);
    else encOpt.step(m.params, m.grads, 1e-4);
    await m.acceleratorUpdate(1e-4, 0.9, 1);
    const dt = performance.now() - t0;
    if (step > 0) {
      times.push(dt);
      integrityMs += (m.integrity?.ms ?? 0) - before;
      messages = sent() - msgs;
    }
  }
  const dataPath = o.link ? link?.dataPath ?? 'grpc' : 'in-process';
  await s.link.close?.();
  const med = median(times);
  return {
    mode: o.mode, ...(o.mode === 'paper' ? { kappa: '1' } : {}), step_ms_median: med, step_ms_min: Math.min(...times),
    peak_rss_mb: Math.round(peakRssMb() * 10) / 10, integrity_share: integrityMs / times.reduce((a, b) => a + b, 0),
    boundary_messages_per_step: messages, transport: o.transport, data_path: dataPath,
  };
}

/**
 * Local, sealed and paper, each in a child process, in one run. With a network transport the
 * split modes run both in-process and over the network, so each networked row carries its
 * ratio to the in-process step measured beside it.
 */
export function benchFinetune(o: { model: string; method: Method; batch: number; seq: number; steps: number; rank: number; transport: string; tensorChannel?: boolean; onProgress?: (i: number, n: number, label: string) => void }): FinetuneBenchResult {
  const bin = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../bin/obfuscatune.js');
  const runs: { mode: TrainMode; transport: string }[] = [{ mode: 'local', transport: 'in-process' }, { mode: 'sealed', transport: 'in-process' }, { mode: 'paper', transport: 'in-process' }];
  if (o.transport !== 'in-process') runs.push({ mode: 'sealed', transport: o.transport }, { mode: 'paper', transport: o.transport });
  const rows: FinetuneBenchRow[] = [];
  runs.forEach(({ mode, transport }, i) => {
    o.onProgress?.(i, runs.length, `${mode} ${transport}`);
    const r = spawnSync(process.execPath, [bin, 'bench', 'finetune-one', '--json', '--model', o.model, '--method', o.method, '--mode', mode,
      '--batch', String(o.batch), '--seq', String(o.seq), '--steps', String(o.steps), '--rank', String(o.rank), '--transport', transport,
      ...(o.tensorChannel === false ? ['--no-tensor-channel'] : [])], { encoding: 'utf8', env: { ...process.env, OBFUSCATUNE_NO_PROGRESS: '1' } });
    if (r.status !== 0) throw new Error(`bench of mode ${mode} (${transport}) failed: ${r.stderr.trim().split('\n').slice(-3).join(' | ')}`);
    const row = JSON.parse(r.stdout.trim().split('\n').pop()!) as FinetuneBenchRow;
    if (transport !== 'in-process') {
      const ref = rows.find((x) => x.mode === mode && x.transport === 'in-process');
      if (ref) row.vs_in_process = row.step_ms_median / ref.step_ms_median;
    }
    rows.push(row);
  });
  o.onProgress?.(runs.length, runs.length, 'done');
  return { model: o.model, method: o.method, batch: o.batch, seq: o.seq, steps: o.steps, transport: o.transport, ...(o.transport !== 'in-process' ? { tensor_channel: o.tensorChannel !== false } : {}), rows };
}

export function formatFinetuneBench(r: FinetuneBenchResult): string {
  const local = r.rows.find((x) => x.mode === 'local')!;
  const lines = [`${r.model}, ${r.method}, batch ${r.batch} x seq ${r.seq}, median of ${r.steps} steps`, 'mode      data path       step ms   vs local  vs in-process  integrity  msgs/step  peak RSS'];
  for (const x of r.rows) {
    const vs = x.vs_in_process !== undefined ? `${x.vs_in_process.toFixed(2)}x` : '-';
    lines.push(`${(x.mode + (x.kappa ? ` k${x.kappa}` : '')).padEnd(9)} ${(x.data_path ?? x.transport).padEnd(14)} ${x.step_ms_median.toFixed(0).padStart(8)}  ${(x.step_ms_median / local.step_ms_median).toFixed(2).padStart(7)}x  ${vs.padStart(13)}  ${(100 * x.integrity_share).toFixed(1).padStart(8)}%  ${String(x.boundary_messages_per_step).padStart(9)}  ${x.peak_rss_mb.toFixed(0).padStart(6)} MB`);
  }
  return lines.join('\n');
}
