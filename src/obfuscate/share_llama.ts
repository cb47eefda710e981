/**
 * `obfuscatune share --family llama`: the enclave/accelerator split of a Llama-family model
 * (RMSNorm, SwiGLU, rotary positions, grouped-query attention), computed from the
 * architecture as `share.ts` does for GPT-2 (forward pass, per token, sequence length T).
 *
 * Per layer the accelerator holds qkv [d, d + 2 kvh hd], o [d, d], gate|up [d, 2 I] (one
 * call: gate and up share the hidden permutation) and down [I, d]; the enclave does the
 * norms, rotary, attention, silu(g) * u and the head. Rotary must act on q and k in a basis
 * where it is defined:
 *   full-masks       q, k come back under full per-head masks and the enclave unmasks them
 *                    before rotary: (H + kvh) hd^2 mask values and 2 hd (d + kvh hd) FLOPs
 *                    per token and layer in the enclave;
 *   rotation-blocks  q, k masks restricted to per-pair rotation-and-scale blocks (c on q,
 *                    1/conj(c) on k), which commute with rotary and cancel in q k^T: no
 *                    unmasking, hd values per head.
 */
import type { Mode } from './masks.js';
import { shareFields, type ShareRow } from './share.js';
import { LLAMA_PRESETS, type LlamaConfig } from '../model/config.js';

/** The published configurations share reports on (the model's presets). */
export const LLAMA_SHARE_MODELS = ['tinyllama-1.1b', 'llama-3.2-1b', 'llama-2-7b'];

export type RotaryMasks = 'full-masks' | 'rotation-blocks';

export interface LlamaShareRow extends ShareRow {
  family: 'llama';
  rotary: RotaryMasks;
}

/** All parameters of the model (embeddings, layers, final norm, head when untied). */
export function llamaParamCount(c: LlamaConfig): number {
  const { n_embd: d, intermediate_size: I, n_layer: L, n_kv_head: kvh, vocab_size: V } = c;
  const kv = kvh * (d / c.n_head);
  const layer = d * (d + 2 * kv) + d * d + 3 * d * I + 2 * d + (c.qkv_bias ? d + 2 * kv : 0);
  return V * d + L * layer + d + (c.tie_word_embeddings ? 0 : d * V);
}

export function llamaShareRow(name: string, c: LlamaConfig, mode: Mode, T: number, rotary: RotaryMasks = 'full-masks'): LlamaShareRow {
  const { n_embd: d, intermediate_size: I, n_layer: L, n_head: H, n_kv_head: kvh, vocab_size: V } = c;
  const hd = d / H;
  const kv = kvh * hd;
  const total = llamaParamCount(c);
  const qkvOut = d + 2 * kv;
  const acc = L * (d * qkvOut + d * d + 2 * d * I + I * d + (c.qkv_bias ? qkvOut : 0));
  // embeddings (rotated), the head: tied it is the table, untied its own [d, V] (in sealed mode folded with the final gain)
  const tables = V * d + (c.tie_word_embeddings ? 0 : d * V);
  const qkMasks = rotary === 'full-masks' ? (H + kvh) * hd * hd : (H + kvh) * hd;
  const perHead = qkMasks + 2 * kvh * hd * hd /* v: B, B^-1 per kv head */ + H /* head permutation */ + I /* hidden permutation */;
  let enclaveParams: number;
  let maskParams: number;
  if (mode === 'sealed') {
    // G = Q^T diag(g_f) (the final norm into the head's basis); RMSNorm needs no centring vector
    maskParams = L * qkMasks;
    enclaveParams = tables + d * d + maskParams;
  } else {
    // input masks R1, R2 on the plain stream; the norms' gains stay in the enclave
    maskParams = L * (2 * d * d + perHead);
    enclaveParams = tables + L * 2 * d + d + maskParams;
  }
  const K = 2;
  const sumInOut = d + qkvOut + 2 * d + d + 2 * I + I + d; // sum of (din + dout) over the four calls
  const integrity = L * K * (2 * sumInOut + 2);
  const accFlops = L * 2 * (d * qkvOut + d * d + 3 * d * I);
  const avgCtx = (T + 1) / 2;
  const attn = 2 * 2 * d * avgCtx + 5 * H * avgCtx; // q k^T and P v over the query heads, softmax
  const rope = 3 * (d + kv); // rotate_half: two multiplies and an add per element of q and k
  const unmask = rotary === 'full-masks' ? 2 * hd * (d + kv) : 0;
  const elementwise = 2 * 4 * d /* two RMSNorms */ + 6 * I /* silu(g) * u */ + 2 * d /* residuals */;
  let enc = L * (attn + rope + unmask + elementwise) + 2 * V * d /* head */ + 4 * d /* final norm */;
  enc += L * K * 2 * sumInOut; // integrity checks of the forward replies
  if (mode === 'sealed') enc += 2 * d * d; // G
  else enc += L * 2 * 2 * d * d; // input masks
  return shareFields({ model: name, family: 'llama' as const, rotary, mode, two_sided: false }, {
    total, acc, enclaveParams, maskParams, integrity, accFlops, enc,
    // sealed: the plain-basis maps for adapters (Q, the norms' gains, v masks, permutations)
    loraExtra: mode === 'sealed' ? d * d + 2 * L * d + L * (perHead - qkMasks) : 0,
    boundary: L * sumInOut,
  });
}

export function llamaShareTable(T: number, models = LLAMA_SHARE_MODELS): LlamaShareRow[] {
  const rows: LlamaShareRow[] = [];
  for (const m of models) {
    const c = LLAMA_PRESETS[m];
    if (!c) throw new Error(`unknown Llama preset "${m}" (known: ${Object.keys(LLAMA_PRESETS).join(', ')})`);
    rows.push(llamaShareRow(m, c, 'sealed', T, 'full-masks'), llamaShareRow(m, c, 'sealed', T, 'rotation-blocks'), llamaShareRow(m, c, 'paper', T, 'full-masks'));
  }
  return rows;
}
