/**
 * `obfuscatune fidelity`: logits of the split (enclave + accelerator) against the plain
 * model on the same tokens, for a list of mask condition numbers and the naive baseline.
 */
import type { GPT2 } from '../model/gpt2.js';
import { KeyedRng, Rng } from '../tensor/rng.js';
import { maskSpecLabel, type MaskSpec, type HaarCache } from '../linalg/masks.js';
import { deriveMasks, type Mode } from '../obfuscate/masks.js';
import { obfuscate } from '../obfuscate/transform.js';
import { Enclave, inProcessSplit } from '../enclave/enclave.js';
import { Llama } from '../model/llama.js';
import { obfuscateLlamaWeights } from '../obfuscate/provider.js';
import type { RotaryMasks } from '../obfuscate/enclave_tensors.js';
import { Accelerator } from '../accelerator/accelerator.js';
import { InProcessLink } from '../protocol/link.js';
import { mixingLabel, type MixingConfig } from '../enclave/mixing.js';

export interface FidelityRow {
  kappa: string;
  max_abs_logit_err: number;
  mean_abs_logit_err: number;
  /** fraction of positions whose arg-max token agrees with the plain model */
  top1_agreement: number;
  /** max |logit| of the plain model, for scale */
  logit_scale: number;
}

export interface FidelityResult {
  model: string;
  mode: Mode;
  tokens: number;
  two_sided: boolean;
  /** per-call token mixing of every accelerator call (null: off) */
  token_mixing: MixingConfig | null;
  /** Llama family: the rotary option */
  rotary_masks?: RotaryMasks;
  rows: FidelityRow[];
}

export function compareLogits(plain: Float32Array, split: Float32Array, rows: number, V: number): Omit<FidelityRow, 'kappa'> {
  let maxErr = 0, sumErr = 0, agree = 0, scale = 0;
  for (let r = 0; r < rows; r++) {
    let a = 0, b = 0;
    for (let i = 0; i < V; i++) {
      const x = plain[r * V + i], y = split[r * V + i];
      const e = Math.abs(x - y);
      if (!(e <= maxErr)) maxErr = Number.isNaN(e) ? Infinity : e;
      sumErr += e;
      if (Math.abs(x) > scale) scale = Math.abs(x);
      if (x > plain[r * V + a]) a = i;
      if (y > split[r * V + b]) b = i;
    }
    if (a === b) agree++;
  }
  return { max_abs_logit_err: maxErr, mean_abs_logit_err: sumErr / (rows * V), top1_agreement: agree / rows, logit_scale: scale };
}

export async function runFidelity(model: GPT2 | Llama, name: string, o: {
  mode: Mode; specs: MaskSpec[]; tokens: number; seed: number; twoSided?: boolean; mixing?: MixingConfig | null; onProgress?: (i: number, n: number, label: string) => void;
  /** Llama family: how q and k are masked around rotary (default full) */
  rotary?: RotaryMasks;
}): Promise<FidelityResult> {
  const c = model.config;
  const T = Math.min(o.tokens, c.n_ctx);
  const B = Math.ceil(o.tokens / T);
  const rng = new Rng(o.seed);
  const tokens = Int32Array.from({ length: B * T }, () => rng.int(c.vocab_size));
  const plain = Float32Array.from((await model.forward(tokens, B, T)).logits);
  const key = KeyedRng.fromSeed(`fidelity-${o.seed}`).key;
  const cache: HaarCache = new Map();
  const rows: FidelityRow[] = [];
  const specs = o.mode === 'sealed' ? o.specs.slice(0, 1) : o.specs;
  for (const [i, spec] of specs.entries()) {
    o.onProgress?.(i, specs.length, `kappa ${maskSpecLabel(spec)}`);
    const params = { mode: o.mode, spec, twoSided: o.twoSided ?? false, headPermutation: true };
    let enclave: Enclave;
    if (model instanceof Llama) {
      enclave = inProcessSplit(obfuscateLlamaWeights(model.weights(), { ...params, key, rotary: o.rotary }), { mixing: o.mixing ?? null }).enclave;
    } else {
      const obf = obfuscate(model.weights(), deriveMasks(c, key, params, undefined, cache));
      const link = new InProcessLink(new Accelerator(obf.accelerator));
      enclave = new Enclave({ mode: o.mode, config: c, tensors: obf.enclave, spec: maskSpecLabel(spec), twoSided: params.twoSided, acceleratorManifestSha256: '' }, link, { mixing: o.mixing ?? null });
    }
    const split = await enclave.forward(tokens, B, T);
    rows.push({ kappa: maskSpecLabel(spec), ...compareLogits(plain, split, B * T, c.vocab_size) });
  }
  o.onProgress?.(specs.length, specs.length, 'done');
  return { model: name, mode: o.mode, tokens: B * T, two_sided: o.twoSided ?? false, token_mixing: o.mixing ?? null, ...(model instanceof Llama ? { rotary_masks: o.rotary ?? 'full' } : {}), rows };
}

export function formatFidelity(r: FidelityResult): string {
  const mix = r.token_mixing ? `, token mixing (${mixingLabel(r.token_mixing)})` : '';
  const lines = [`${r.model}, ${r.mode} mode${r.two_sided ? ' (two-sided)' : ''}${r.rotary_masks ? `, ${r.rotary_masks} rotary masks` : ''}${mix}, ${r.tokens} tokens: split vs plain logits`, 'kappa     max |err|     mean |err|    top-1 agreement'];
  for (const x of r.rows) {
    lines.push(`${x.kappa.padEnd(8)}  ${x.max_abs_logit_err.toExponential(3).padEnd(12)}  ${x.mean_abs_logit_err.toExponential(3).padEnd(12)}  ${(100 * x.top1_agreement).toFixed(1)}%`);
  }
  return lines.join('\n');
}
