/**
 * `obfuscatune share`: how the work and the secrets split between the enclave and the
 * accelerator, computed from the architecture (forward pass, per token, sequence length T).
 */
import type { GPT2Config } from '../model/config.js';
import { getPreset } from '../model/config.js';
import { paramCount } from '../model/params.js';
import type { Mode } from './masks.js';

export interface ShareRow {
  model: string;
  mode: Mode;
  two_sided: boolean;
  params_total: number;
  accelerator_params: number;
  enclave_params: number;
  /** enclave parameters (including folded matrices and run-time masks) / all model parameters */
  enclave_param_share: number;
  /** bytes of everything secret the enclave holds at run time (float32), masks included */
  enclave_state_bytes: number;
  /** of which per-layer masks */
  enclave_mask_bytes: number;
  /**
   * sealed: what the bundle also carries for training in the plain basis (Q, the layer
   * norms' affine part, per-head masks, permutations), unused by inference and not in
   * enclave_params (paper mode has these in its masks already)
   */
  enclave_lora_extra_bytes: number;
  /** of which the secret Freivalds vectors (integrity checks; not model parameters) */
  enclave_integrity_bytes: number;
  accelerator_flops_per_token: number;
  enclave_flops_per_token: number;
  enclave_flop_share: number;
  boundary_bytes_per_token: number;
  round_trips_per_layer: number;
}

export function shareRow(name: string, c: GPT2Config, mode: Mode, T: number, twoSided = false): ShareRow {
  const { n_layer: L, n_embd: d, vocab_size: V, n_ctx, n_head: H } = c;
  const total = paramCount(c);
  const acc = L * (12 * d * d + 9 * d);
  const emb = V * d + n_ctx * d;
  let enclaveParams: number;
  let maskParams = 0;
  if (mode === 'sealed') {
    enclaveParams = emb + d * d /* G */ + d /* head bias */ + d /* u */;
  } else {
    // input masks R1, R2 (+ Ro^-1, Rp^-1), per-head A, A^-T, B, B^-1, head and hidden permutations
    maskParams = L * 2 * d * d * (twoSided ? 2 : 1) + L * (4 * d * (d / c.n_head) + c.n_head + 4 * d);
    enclaveParams = emb + L * 4 * d + 2 * d + maskParams;
  }
  // Freivalds vectors: per linear K x (r, s, w, v) plus K biases; sum of (din + dout) over the four linears = 16 d
  const K = 2;
  const integrity = L * K * (2 * 16 * d + 4);
  // forward FLOPs per token (multiply-add = 2)
  const accFlops = L * 2 * 12 * d * d;
  const avgCtx = (T + 1) / 2; // causal attention: position t attends to t+1 keys
  const attn = 2 * 2 * d * avgCtx + 5 * H * avgCtx; // q k^T and P v, plus softmax
  const elementwise = 2 * 8 * d /* two norms */ + 4 * d * 10 /* GELU */ + 2 * d /* residuals */;
  let enc = L * (attn + elementwise) + 2 * V * d /* head */ + d;
  enc += L * K * 2 * 16 * d; // integrity checks of the forward replies
  if (mode === 'sealed') enc += 2 * d * d; // G
  else enc += L * 2 * 2 * d * d * (twoSided ? 2 : 1); // input (and output) masks
  return shareFields({ model: name, mode, two_sided: twoSided }, {
    total, acc, enclaveParams, maskParams, integrity, accFlops, enc,
    loraExtra: mode === 'sealed' ? d * d + 4 * L * d + L * (4 * d * (d / H) + H + 4 * d) : 0,
    // per layer: out d + d + d + 4d, back 3d + d + 4d + d (float32)
    boundary: L * 16 * d,
  });
}

/** Counts (parameters, FLOPs per token, values per token) -> a row: bytes are float32. */
export function shareFields<T extends Pick<ShareRow, 'model' | 'mode' | 'two_sided'>>(head: T, n: { total: number; acc: number; enclaveParams: number; maskParams: number; integrity: number; loraExtra: number; accFlops: number; enc: number; boundary: number }): T & ShareRow {
  return {
    ...head,
    params_total: n.total,
    accelerator_params: n.acc,
    enclave_params: n.enclaveParams,
    enclave_param_share: n.enclaveParams / n.total,
    enclave_state_bytes: 4 * (n.enclaveParams + n.integrity),
    enclave_mask_bytes: 4 * n.maskParams,
    enclave_lora_extra_bytes: 4 * n.loraExtra,
    enclave_integrity_bytes: 4 * n.integrity,
    accelerator_flops_per_token: n.accFlops,
    enclave_flops_per_token: n.enc,
    enclave_flop_share: n.enc / (n.enc + n.accFlops),
    boundary_bytes_per_token: 4 * n.boundary,
    round_trips_per_layer: 4,
  };
}

export function shareTable(T: number, models = ['gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl']): ShareRow[] {
  const rows: ShareRow[] = [];
  for (const m of models) {
    const c = getPreset(m);
    rows.push(shareRow(m, c, 'sealed', T));
    rows.push(shareRow(m, c, 'paper', T));
    rows.push(shareRow(m, c, 'paper', T, true));
  }
  return rows;
}
