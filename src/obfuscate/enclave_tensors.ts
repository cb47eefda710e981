/**
 * What the enclave holds, one structure per mode, fields named as the bundle's tensors
 * (docs/obfuscation.md). V vocabulary, T context, L layers, d width, H heads, dh = d / H,
 * K labels. Only the bundle's loader and writer (bundle.ts) go by names.
 */
import type { CheckVectors } from '../protocol/integrity.js';
import type { LinearName } from '../model/block.js';

/**
 * One block linear's part of the provider's delta over a public base, masked as the
 * accelerator's weights are (public-base bundles): y* = x* W*b + (x* U) V + b.
 */
export interface LinearDelta {
  rank: number;
  U: Float32Array; // [din, rank]  In U (the input side of the masks)
  V: Float32Array; // [rank, dout] V Out (the output side)
  b: Float32Array; // [dout]       (b'p - b'b) Out: the bias difference
}
export type DeltaTensors = Record<LinearName, LinearDelta>[]; // [L]

interface CommonTensors {
  wte: Float32Array; //   [V, d] token embeddings (sealed: wte Q)
  wpe: Float32Array; //   [T, d] position embeddings (sealed: wpe Q)
  ln1w: Float32Array; ln1b: Float32Array; ln2w: Float32Array; ln2b: Float32Array; // [L, d] (sealed: for adapters only)
  score?: Float32Array; // [K, d] classifier (sealed: score Q)
  chk: CheckVectors | null; // secret vectors checking every accelerator reply (null: unchecked)
  delta?: DeltaTensors | null; // the model's delta over the public base the accelerator holds (null: none)
}

/** The per-head attention masks and the MLP permutation of every layer (paper and sealed). */
export interface HeadMasks {
  hA: Float32Array; //     [L, H, dh, dh] q mask A
  hAinvT: Float32Array; // [L, H, dh, dh] k mask A^-T
  hB: Float32Array; //     [L, H, dh, dh] v mask B
  hBinv: Float32Array; //  [L, H, dh, dh] B^-1 (the attention output back to plain)
  headPerm: Int32Array; // [L, H]         masked slot j holds head headPerm[j]
  pi: Int32Array; //       [L, 4d]        f*[:, j] = f[:, pi[j]]
}

/** local: the plain model's part (the baseline: nothing is masked). */
export interface PlainEnclaveTensors extends CommonTensors {
  mode: 'local';
  lnfw: Float32Array; lnfb: Float32Array; // [d] final norm
}

/** paper: plain stream and norms, masked linear inputs (and outputs, two-sided). */
export interface PaperEnclaveTensors extends CommonTensors, HeadMasks {
  mode: 'paper';
  lnfw: Float32Array; lnfb: Float32Array; // [d] final norm
  R1: Float32Array; R2: Float32Array; //     [L, d, d] input masks of qkv and fc
  RoInv: Float32Array | null; RpInv: Float32Array | null; // [L, d, d] two-sided: output masks of attproj, fcproj, inverted
}

/** sealed: the stream in a secret orthogonal basis h* = h Q, the final norm folded. */
export interface SealedEnclaveTensors extends CommonTensors, HeadMasks {
  mode: 'sealed';
  Q: Float32Array; //        [d, d] the stream's basis (training carries adapters and tables across with it)
  G: Float32Array; //        [d, d] Q^T diag(gamma_f) Q
  u: Float32Array; //        [d]    Q^T 1 (centring in the rotated basis)
  headBias: Float32Array; // [d]    beta_f Q
}

/** What an obfuscation makes and an enclave bundle holds. */
export type ObfuscatedTensors = PaperEnclaveTensors | SealedEnclaveTensors;
export type EnclaveTensors = PlainEnclaveTensors | ObfuscatedTensors;

type FloatKeys<T> = { [K in keyof T]-?: NonNullable<T[K]> extends Float32Array ? K : never }[keyof T];
/** The float32 tensors' names of every mode, and any mode's tensors by them (for code that picks by name). */
export type FloatName = FloatKeys<PlainEnclaveTensors> | FloatKeys<PaperEnclaveTensors> | FloatKeys<SealedEnclaveTensors>
  | FloatKeys<LlamaPlainTensors> | FloatKeys<LlamaPaperTensors> | FloatKeys<LlamaSealedTensors>;
export type FloatFields = { [K in FloatName]?: Float32Array | null };

// ---------------------------------------------------------------------------------------
// The Llama family (docs/obfuscation.md, "Llama family"). NH query heads, NKV key/value
// heads (grouped queries: NH / NKV per group), hd = C / NH, I = MLP width, KV = NKV hd.

/** How q and k are masked around rotary: full per-head masks unmasked in the enclave, or rotation-and-scale pairs that commute with it. */
export type RotaryMasks = 'full' | 'blocks';

/** The per-head masks and the MLP permutation of every Llama layer (paper and sealed). */
export interface LlamaHeadMasks {
  qM: Float32Array; qMinv: Float32Array; // [L, NH, hd, hd]  q head h: q* = q qM
  kM: Float32Array; kMinv: Float32Array; // [L, NKV, hd, hd] k head g ('blocks': kM = qM^-T of its group)
  vM: Float32Array; vMinv: Float32Array; // [L, NKV, hd, hd] v head g
  headPerm: Int32Array; //                  [L, NKV]         masked kv slot j holds group headPerm[j] (its query heads move with it)
  pi: Int32Array; //                        [L, I]           gate*[:, j] = gate[:, pi[j]], likewise up
  rotary: RotaryMasks;
}

interface LlamaCommonTensors {
  family: 'llama';
  wte: Float32Array; //          [V, C] token embeddings (sealed: wte Q)
  head: Float32Array | null; //  [V, C] untied LM head (sealed: head Q); null: tied to wte
  ln1w: Float32Array; ln2w: Float32Array; // [L, C] RMSNorm gains (sealed: for adapters only)
  score?: Float32Array; //       [K, C] classifier (sealed: score Q)
  chk: CheckVectors | null;
}

/** local: the plain model's part (the baseline). */
export interface LlamaPlainTensors extends LlamaCommonTensors {
  mode: 'local';
  lnfw: Float32Array; // [C]
}

/** paper: plain stream and norms, masked linear inputs (and outputs, two-sided). */
export interface LlamaPaperTensors extends LlamaCommonTensors, LlamaHeadMasks {
  mode: 'paper';
  lnfw: Float32Array; //                 [C]
  R1: Float32Array; R2: Float32Array; // [L, C, C] input masks of qkv and gateup
  RoInv: Float32Array | null; RpInv: Float32Array | null; // [L, C, C] two-sided: output masks of o and down, inverted
}

/** sealed: the stream in a secret orthogonal basis h* = h Q (RMSNorm needs no centring), the final gain folded. */
export interface LlamaSealedTensors extends LlamaCommonTensors, LlamaHeadMasks {
  mode: 'sealed';
  Q: Float32Array; // [C, C]
  G: Float32Array; // [C, C] Q^T diag(g_f) Q
}

export type LlamaObfuscatedTensors = LlamaPaperTensors | LlamaSealedTensors;
export type LlamaEnclaveTensors = LlamaPlainTensors | LlamaObfuscatedTensors;
