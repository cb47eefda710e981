/**
 * mlp-permutation (public-base setting): the MLP hidden f* = f Pi is only permuted, so each
 * masked unit keeps its activation statistics. The attacker runs the public model on a public
 * corpus, summarises every hidden unit (mean, spread, quantiles, share of positive values,
 * and the unit's bias, which the bundle holds permuted but otherwise plain) and matches the
 * view's units to the public ones by a minimum-cost assignment.
 * Metric: the fraction of units matched to their true place (the provider's Pi).
 */
import type { GPT2Weights } from '../model/weights.js';
import type { LoadedView, ViewTruth } from '../protocol/view.js';
import { obfuscateWeights } from '../obfuscate/provider.js';
import { inProcessSplit } from '../enclave/enclave.js';
import { tokenizerFor } from '../model/tokenizer.js';
import { readJsonl } from '../io/jsonl.js';
import { InputError } from '../errors.js';
import { gpt2Linears } from '../protocol/linears.js';
import { hungarian, scaledDistances } from './linalg.js';
import { blockWeightsOf } from './weight_alignment.js';
import { resultBase, twoPhases, type AttackProgress, type AttackResult } from './common.js';

const NF = 6;

/** Per-unit statistics of rows [n, w]: mean, std, q10, q50, q90, share > 0 */
export function unitStats(chunks: Float32Array[], w: number, maxRows: number): Float64Array {
  const rows = Math.min(maxRows, chunks.reduce((s, c) => s + c.length / w, 0));
  const out = new Float64Array(w * NF);
  const col = new Float64Array(rows);
  for (let j = 0; j < w; j++) {
    let k = 0;
    for (const c of chunks) {
      const n = c.length / w;
      for (let r = 0; r < n && k < rows; r++) col[k++] = c[r * w + j];
      if (k >= rows) break;
    }
    let m = 0, pos = 0;
    for (let i = 0; i < rows; i++) { m += col[i]; if (col[i] > 0) pos++; }
    m /= rows;
    let v = 0;
    for (let i = 0; i < rows; i++) v += (col[i] - m) ** 2;
    const sorted = Float64Array.from(col.subarray(0, rows)).sort();
    const q = (x: number) => sorted[Math.min(rows - 1, Math.floor(x * rows))];
    out.set([m, Math.sqrt(v / rows), q(0.1), q(0.5), q(0.9), pos / rows], j * NF);
  }
  return out;
}

/** Hidden activations f [rows, 4d] of every layer of the public model on a public corpus (plain order). */
export async function publicHidden(pub: GPT2Weights, corpus: string, tokens: number, seqLen: number, onProgress?: AttackProgress): Promise<Float32Array[][]> {
  const c = pub.config;
  const tok = tokenizerFor(c.vocab_size);
  const stream: number[] = [];
  for (const r of readJsonl(corpus)) {
    stream.push(...tok.encode(r.text ?? `${r.prompt ?? ''}${r.completion ?? ''}`), tok.eotId);
    if (stream.length >= tokens) break;
  }
  if (stream.length < seqLen) throw new InputError(`public corpus ${corpus} has only ${stream.length} tokens; need at least ${seqLen}`);
  // the public model through the split with a key the attacker chose, so the hidden units can be put back in order
  const r = obfuscateWeights(pub, { mode: 'sealed', seed: 4242 });
  const { link, enclave } = inProcessSplit(r);
  const L = c.n_layer, w = 4 * c.n_embd;
  const out: Float32Array[][] = Array.from({ length: L }, () => []);
  const pi = r.enclave.tensors.pi;
  link.observers.push((e) => {
    if (e.direction !== 'to_enclave' || e.op !== 'linear_forward' || e.name !== 'fc' || e.layer === undefined) return;
    const l = e.layer, n = e.rows;
    const f = new Float32Array(n * w);
    for (let i = 0; i < n; i++) for (let j = 0; j < w; j++) f[i * w + pi[l * w + j]] = e.data[i * w + j];
    out[l].push(f);
  });
  const T = Math.min(seqLen, c.n_ctx);
  const B = Math.max(1, Math.min(8, Math.floor(stream.length / T)));
  const end = Math.min(stream.length, tokens), n = Math.floor(end / (B * T));
  for (let s = 0; s + B * T <= end; s += B * T) {
    onProgress?.(s / (B * T), n, `forward ${s / (B * T) + 1}/${n}`);
    await enclave.forward(Int32Array.from(stream.slice(s, s + B * T)), B, T);
  }
  return out;
}

export interface MlpPermutationOptions {
  corpus: string;
  publicTokens?: number;
  maxRows?: number;
  onProgress?: AttackProgress;
}

export async function mlpPermutationAttack(view: LoadedView, pub: GPT2Weights, truth: ViewTruth | null, o: MlpPermutationOptions): Promise<AttackResult> {
  const t0 = performance.now();
  const c = view.header.config;
  const w = 4 * c.n_embd;
  const maxRows = o.maxRows ?? 16384;
  const seen: Float32Array[][] = Array.from({ length: c.n_layer }, () => []);
  let batches = 0;
  view.events.forEach((e, i) => {
    if (e.direction === 'to_enclave' && e.op === 'linear_forward' && e.name === 'fc' && e.layer >= 0 && e.layer < c.n_layer) {
      seen[e.layer].push(view.tensor(i));
      if (e.layer === 0) batches++;
    }
  });
  if (seen.every((s) => s.length === 0)) throw new InputError(`view ${view.file} holds no MLP hidden activations (fc outputs); record it without a layer filter`);
  const phase = twoPhases(o.onProgress, c.n_layer, 'the public model on the corpus');
  const pubF = await publicHidden(pub, o.corpus, o.publicTokens ?? 8192, 64, phase.first);
  const bundle = gpt2Linears(view.bundle(), 'mlp-permutation');
  const pubW = blockWeightsOf(pub, view.header.mode === 'sealed');
  const perLayer: (number | null)[] = [];
  const found: Int32Array[] = [];
  for (let l = 0; l < c.n_layer; l++) {
    phase.next(l, `matching the units of layer ${l}`);
    if (seen[l].length === 0) { perLayer.push(null); continue; }
    const fs = unitStats(seen[l], w, maxRows), fp = unitStats(pubF[l], w, maxRows);
    const F = NF + 1;
    const a = new Float64Array(w * F), b = new Float64Array(w * F);
    for (let j = 0; j < w; j++) {
      a.set(fs.subarray(j * NF, (j + 1) * NF), j * F); a[j * F + NF] = bundle.layers[l].fc.b[j];
      b.set(fp.subarray(j * NF, (j + 1) * NF), j * F); b[j * F + NF] = pubW[l].fcb[j];
    }
    const p = hungarian(scaledDistances(a, b, w, F), w);
    found.push(p);
    if (truth?.pi) {
      let ok = 0;
      for (let j = 0; j < w; j++) if (p[j] === truth.pi[l][j]) ok++;
      perLayer.push(ok / w);
    } else perLayer.push(null);
  }
  phase.next(c.n_layer, 'done');
  const scoredLayers = perLayer.filter((x): x is number => x !== null);
  const value = scoredLayers.length ? scoredLayers.reduce((s, x) => s + x, 0) / scoredLayers.length : NaN;
  return {
    ...resultBase(view, 'mlp-permutation', 'public-base'),
    metric: 'units_matched', value, baseline: 1 / w, observed_batches: batches,
    details: { per_layer: perLayer, units: w, seconds: (performance.now() - t0) / 1000 },
  };
}
