/**
 * The provider's secret masks for one model, derived deterministically from a 256-bit key
 * (so the provider keeps 32 bytes, not gigabytes, and can regenerate everything for
 * `deobfuscate`). Every mask gets its own ChaCha20 sub-stream, labelled by layer and role.
 */
import type { GPT2Config } from '../model/config.js';
import { KeyedRng } from '../tensor/rng.js';
import { makeMask, randomPermutation, kappaMask, type MaskPair, type MaskSpec, type HaarCache, type StreamFactory } from '../linalg/masks.js';

export type Mode = 'sealed' | 'paper';

export interface ObfuscationParams {
  mode: Mode;
  /** Input masks (paper mode) and per-head masks (both modes). */
  spec: MaskSpec;
  /** Paper mode: also mask the outputs of the attention and MLP projections. */
  twoSided: boolean;
  /** Secretly permute the heads (free). */
  headPermutation: boolean;
}

export interface LayerMasks {
  /** Per-head query/key masks A_i (d_h x d_h) and value masks B_i, indexed by original head. */
  A: MaskPair[];
  B: MaskPair[];
  /** Head permutation: masked head slot j holds original head headPerm[j]. */
  headPerm: Int32Array;
  /** MLP hidden permutation: f* column j = f column pi[j]. */
  pi: Int32Array;
  /** Paper mode input masks (attention input, MLP input) and two-sided output masks. */
  R1?: MaskPair;
  R2?: MaskPair;
  Ro?: MaskPair;
  Rp?: MaskPair;
}

export interface ModelMasks {
  params: ObfuscationParams;
  /** Sealed mode: the residual-stream basis Q (orthogonal). */
  Q?: MaskPair;
  layers: LayerMasks[];
}

/**
 * Derives every mask of a model from the key. `cache` (optional) shares Haar factors
 * between calls with the same key that differ only in kappa.
 */
export function deriveMasks(config: GPT2Config, key: Buffer, params: ObfuscationParams, onLayer?: (l: number) => void, cache?: HaarCache): ModelMasks {
  const root = new KeyedRng(key);
  const { n_layer: L, n_embd: d, n_head: H } = config;
  const dh = d / H;
  const out: ModelMasks = { params, layers: [] };
  const cacheKey = cache ? root.derive('cache-id').nextU32().toString(16) + root.derive('cache-id2').nextU32().toString(16) : '';
  const streams = (label: string): StreamFactory => (part) => root.derive(`${label}/${part}`);
  const mask = (n: number, spec: MaskSpec, label: string) => makeMask(n, spec, streams(label), cache, `${cacheKey}/${label}`);
  if (params.mode === 'sealed') out.Q = kappaMask(d, 1, streams('Q'), cache, `${cacheKey}/Q`);
  for (let l = 0; l < L; l++) {
    const A: MaskPair[] = [];
    const B: MaskPair[] = [];
    for (let h = 0; h < H; h++) {
      A.push(mask(dh, params.spec, `layer${l}/A${h}`));
      B.push(mask(dh, params.spec, `layer${l}/B${h}`));
    }
    const headPerm = params.headPermutation ? randomPermutation(H, root.derive(`layer${l}/heads`)) : Int32Array.from({ length: H }, (_, i) => i);
    const lm: LayerMasks = { A, B, headPerm, pi: randomPermutation(4 * d, root.derive(`layer${l}/pi`)) };
    if (params.mode === 'paper') {
      lm.R1 = mask(d, params.spec, `layer${l}/R1`);
      lm.R2 = mask(d, params.spec, `layer${l}/R2`);
      if (params.twoSided) {
        lm.Ro = mask(d, params.spec, `layer${l}/Ro`);
        lm.Rp = mask(d, params.spec, `layer${l}/Rp`);
      }
    }
    out.layers.push(lm);
    onLayer?.(l);
  }
  return out;
}
