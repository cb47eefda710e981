/**
 * `experiment public-base`: what keeping the provider's delta in the enclave costs in
 * accuracy, against its rank. For each choice (a rank, or an energy share) the truncated
 * delta's relative error ||D - U V|| / ||D|| over every block linear, the enclave's share of
 * the work (parameters of U, V against the linears'), and the factored model's next-token
 * loss and top-1 accuracy on held-out text beside the provider's full model and the public
 * base alone (rank 0: only the bias difference is kept).
 */
import { loadCheckpoint } from '../model/checkpoint.js';
import { GPT2 } from '../model/gpt2.js';
import type { GPT2Weights } from '../model/weights.js';
import { tokenizerFor } from '../model/tokenizer.js';
import { corpusFromJsonl } from '../train/pretrain.js';
import { windowBatches } from '../train/lm.js';
import { obfuscateWeights } from '../obfuscate/provider.js';
import { deobfuscate } from '../obfuscate/transform.js';
import { deriveMasks, type Mode } from '../obfuscate/masks.js';
import type { RankChoice } from '../linalg/svd.js';
import { LINEARS, linearDims } from '../model/block.js';

export interface PublicBaseCostOptions {
  publicModel: string;
  /** the provider's model (derived from the public one) */
  providerModel: string;
  /** held-out text (JSONL) */
  evalFile: string;
  choices: RankChoice[];
  mode: Mode;
  seq: number;
  batch: number;
  maxBatches: number;
  log?: (s: string) => void;
  /** a unit per model scored (the provider's, then one per choice) */
  onProgress?: (done: number, total: number, label: string) => void;
}

export interface PublicBaseCostRow {
  choice: string;
  mean_rank: number;
  delta_relative_error: number;
  /** parameters of U and V as a share of the block linears' */
  enclave_params_share: number;
  loss: number;
  loss_change: number;
  accuracy: number;
  /** share of positions where the factored model's top-1 token is the provider model's */
  top1_agreement: number;
}

export interface PublicBaseCost {
  format: 'obfuscatune-public-base-cost/1';
  public_model: string;
  provider_model: string;
  eval: string;
  mode: Mode;
  tokens: number;
  provider: { loss: number; accuracy: number };
  public_base: { loss: number; accuracy: number; delta_relative_size: number };
  rows: PublicBaseCostRow[];
}

/** Next-token loss, top-1 accuracy and top-1 predictions over consecutive windows of a stream. */
async function scoreLM(w: GPT2Weights, stream: Int32Array, T: number, batch: number, maxBatches: number): Promise<{ loss: number; accuracy: number; top1: Int32Array }> {
  const m = new GPT2(w);
  const V = w.config.vocab_size;
  const windows = Math.min(Math.floor((stream.length - 1) / T), batch * maxBatches);
  const top1 = new Int32Array(windows * T);
  let loss = 0, ok = 0;
  for (const { w: w0, B, inputs, targets: y } of windowBatches(stream, T, batch, maxBatches)) {
    const { logits } = await m.forward(inputs, B, T, null, false);
    for (let i = 0; i < B * T; i++) {
      let best = 0, mx = -Infinity, s = 0;
      for (let v = 0; v < V; v++) if (logits[i * V + v] > mx) { mx = logits[i * V + v]; best = v; }
      for (let v = 0; v < V; v++) s += Math.exp(logits[i * V + v] - mx);
      loss += Math.log(s) + mx - logits[i * V + y[i]];
      ok += best === y[i] ? 1 : 0;
      top1[w0 * T + i] = best;
    }
  }
  return { loss: loss / top1.length, accuracy: ok / top1.length, top1 };
}

const label = (c: RankChoice) => (c.rank !== undefined ? `rank ${c.rank}` : `energy ${c.energy}`);

export async function runPublicBaseCost(o: PublicBaseCostOptions): Promise<PublicBaseCost> {
  const log = o.log ?? (() => {});
  const pub = loadCheckpoint(o.publicModel), prov = loadCheckpoint(o.providerModel);
  const T = Math.min(o.seq, prov.config.n_ctx);
  const { stream } = corpusFromJsonl([o.evalFile], tokenizerFor(prov.config.vocab_size), true);
  const choices = [{ rank: 0 }, ...o.choices];
  o.onProgress?.(0, 1 + choices.length, 'the provider model');
  const full = await scoreLM(prov, stream, T, o.batch, o.maxBatches);
  const agree = (a: Int32Array) => a.reduce((s, t, i) => s + (t === full.top1[i] ? 1 : 0), 0) / a.length;
  const d = prov.config.n_embd;
  const linearParams = LINEARS.reduce((s, n) => s + linearDims(n, d)[0] * linearDims(n, d)[1], 0) * prov.config.n_layer;
  const rows: PublicBaseCostRow[] = [];
  let base = { loss: NaN, accuracy: NaN, delta_relative_size: NaN };
  for (const [i, choice] of choices.entries()) {
    o.onProgress?.(1 + i, 1 + choices.length, label(choice));
    const obf = obfuscateWeights(prov, { mode: o.mode, seed: 0, publicBase: { weights: pub, choice } });
    const r = obf.delta!;
    const fm = deobfuscate(prov, obf.accelerator, obf.enclave.tensors, deriveMasks(prov.config, obf.key, obf.params)); // the factored model
    const s = await scoreLM(fm, stream, T, o.batch, o.maxBatches);
    const ranks = r.ranks.flatMap((x) => LINEARS.map((n) => [n, x[n]] as const));
    const row: PublicBaseCostRow = {
      choice: label(choice), mean_rank: ranks.reduce((a, [, k]) => a + k, 0) / ranks.length,
      delta_relative_error: Math.sqrt(r.residual / Math.max(r.total, 1e-300)),
      enclave_params_share: ranks.reduce((a, [n, k]) => a + k * (linearDims(n, d)[0] + linearDims(n, d)[1]), 0) / linearParams,
      loss: s.loss, loss_change: s.loss - full.loss, accuracy: s.accuracy, top1_agreement: agree(s.top1),
    };
    if (choice.rank === 0 && rows.length === 0) {
      let wn = 0;
      for (const k of ['qkvw', 'attprojw', 'fcw', 'fcprojw'] as const) for (const x of pub.layout.view(pub.params, k)) wn += x * x;
      base = { loss: s.loss, accuracy: s.accuracy, delta_relative_size: Math.sqrt(r.total / wn) };
    }
    rows.push(row);
    log(`${row.choice}: mean rank ${row.mean_rank.toFixed(1)}, delta error ${row.delta_relative_error.toFixed(3)}, loss ${row.loss.toFixed(4)} (${row.loss_change >= 0 ? '+' : ''}${row.loss_change.toFixed(4)}), accuracy ${(100 * row.accuracy).toFixed(2)}%`);
  }
  return {
    format: 'obfuscatune-public-base-cost/1', public_model: o.publicModel, provider_model: o.providerModel, eval: o.evalFile, mode: o.mode,
    tokens: full.top1.length, provider: { loss: full.loss, accuracy: full.accuracy }, public_base: base, rows,
  };
}

export function publicBaseCostTable(r: PublicBaseCost): { head: string[]; rows: string[][] } {
  return {
    head: ['delta kept', 'mean rank', 'delta rel. error', 'enclave params', 'loss', 'loss change', 'top-1 accuracy', 'top-1 = provider'],
    rows: r.rows.map((x) => [x.choice, x.mean_rank.toFixed(1), x.delta_relative_error.toFixed(3), `${(100 * x.enclave_params_share).toFixed(1)}%`, x.loss.toFixed(4),
      `${x.loss_change >= 0 ? '+' : ''}${x.loss_change.toFixed(4)}`, `${(100 * x.accuracy).toFixed(2)}%`, `${(100 * x.top1_agreement).toFixed(1)}%`]),
  };
}
