/**
 * The provider transform: plain GPT-2 weights + masks -> the accelerator's obfuscated
 * linear weights and the enclave's small remainder; and back (`deobfuscate`).
 * Masks are generated and inverted in float64 and applied in float32 (native GEMM).
 * Row-vector convention: y = x W + b, W is d_in x d_out.
 */
import type { GPT2Weights } from '../model/weights.js';
import { ParamLayout } from '../model/params.js';
import { sgemm } from '../tensor/gemm.js';
import { transpose, type Mat64 } from '../linalg/mat64.js';
import type { ModelMasks, LayerMasks, Mode } from './masks.js';
import { LINEARS, linearDims, type LinearName } from '../model/block.js';
import { gpt2Linears, type AcceleratorWeights, type ObfLinear } from '../protocol/linears.js';
import type { DeltaTensors, HeadMasks, ObfuscatedTensors } from './enclave_tensors.js';
import { truncatedSvd, type RankChoice } from '../linalg/svd.js';
import { BundleError } from '../errors.js';

export const f32 = (m: Mat64): Float32Array => Float32Array.from(m.data);

/** out[rows, n] = M[rows, k] X[k, n] (float32) */
export function mm(M: Float32Array, X: Float32Array, rows: number, k: number, n: number, transM = false): Float32Array {
  const out = new Float32Array(rows * n);
  sgemm(transM, false, rows, n, k, 1, M, transM ? rows : k, X, n, 0, out, n);
  return out;
}

/**
 * Per-head right multiplication on a section of columns: for each masked head slot j,
 * Y[:, off + j dh] = X[:, off + perm[j] dh] M[perm[j]]. With `inverse`, the opposite map
 * X[:, off + perm[j] dh] = Y[:, off + j dh] M[perm[j]] (pass the inverse matrices).
 */
function headRight(src: Float32Array, dst: Float32Array, rows: number, ld: number, off: number, mats: Float32Array[], perm: Int32Array, dh: number, inverse: boolean): void {
  for (let j = 0; j < perm.length; j++) {
    const h = perm[j];
    const from = off + (inverse ? j : h) * dh;
    const to = off + (inverse ? h : j) * dh;
    sgemm(false, false, rows, dh, dh, 1, src.subarray(from), ld, mats[h], dh, 0, dst.subarray(to), ld);
  }
}

/**
 * Per-head left multiplication on row blocks: W*[j block] = M[perm[j]] W[perm[j] block]
 * (or, with inverse, W[perm[j] block] = M[perm[j]] W*[j block]). W is [H*dh, n].
 */
function headLeft(src: Float32Array, dst: Float32Array, n: number, mats: Float32Array[], perm: Int32Array, dh: number, inverse: boolean): void {
  for (let j = 0; j < perm.length; j++) {
    const h = perm[j];
    const from = (inverse ? j : h) * dh * n;
    const to = (inverse ? h : j) * dh * n;
    sgemm(false, false, dh, n, dh, 1, mats[h], dh, src.subarray(from), n, 0, dst.subarray(to), n);
  }
}

interface HeadMats {
  A: Float32Array[]; Ainv: Float32Array[]; AinvT: Float32Array[]; AT: Float32Array[]; B: Float32Array[]; Binv: Float32Array[];
}
function headMats(lm: LayerMasks): HeadMats {
  return {
    A: lm.A.map((p) => f32(p.m)),
    Ainv: lm.A.map((p) => f32(p.inv)),
    AinvT: lm.A.map((p) => f32(transpose(p.inv))),
    AT: lm.A.map((p) => f32(transpose(p.m))),
    B: lm.B.map((p) => f32(p.m)),
    Binv: lm.B.map((p) => f32(p.inv)),
  };
}

/** X[rows, 3d] -> X Mqkv (forward) or X Mqkv^-1 (inverse). */
export function applyMqkv(X: Float32Array, rows: number, d: number, dh: number, lm: LayerMasks, inverse: boolean, hm = headMats(lm)): Float32Array {
  const Y = new Float32Array(rows * 3 * d);
  const p = lm.headPerm;
  // q: A, k: A^-T, v: B ; inverses: A^-1, A^T, B^-1
  headRight(X, Y, rows, 3 * d, 0, inverse ? hm.Ainv : hm.A, p, dh, inverse);
  headRight(X, Y, rows, 3 * d, d, inverse ? hm.AT : hm.AinvT, p, dh, inverse);
  headRight(X, Y, rows, 3 * d, 2 * d, inverse ? hm.Binv : hm.B, p, dh, inverse);
  return Y;
}

/** X[rows, 4d] -> X Pi (columns permuted: out[:, j] = X[:, pi[j]]) or the inverse. */
export function permuteCols(X: Float32Array, rows: number, n: number, pi: Int32Array, inverse: boolean): Float32Array {
  const Y = new Float32Array(rows * n);
  for (let r = 0; r < rows; r++) {
    const o = r * n;
    if (inverse) for (let j = 0; j < n; j++) Y[o + pi[j]] = X[o + j];
    else for (let j = 0; j < n; j++) Y[o + j] = X[o + pi[j]];
  }
  return Y;
}

/** Pi^T W for W [4d, n]: row j of the result is row pi[j] of W (or the inverse). */
export function permuteRows(W: Float32Array, rows: number, n: number, pi: Int32Array, inverse: boolean): Float32Array {
  const Y = new Float32Array(rows * n);
  for (let j = 0; j < rows; j++) {
    if (inverse) Y.set(W.subarray(j * n, (j + 1) * n), pi[j] * n);
    else Y.set(W.subarray(pi[j] * n, (pi[j] + 1) * n), j * n);
  }
  return Y;
}

export function scaleRows(W: Float32Array, rows: number, n: number, s: Float32Array, invert = false): Float32Array {
  const Y = new Float32Array(rows * n);
  for (let i = 0; i < rows; i++) {
    const f = invert ? 1 / s[i] : s[i];
    for (let j = 0; j < n; j++) Y[i * n + j] = W[i * n + j] * f;
  }
  return Y;
}

/** b + beta W (row vector times matrix), W [d, n] */
function foldBias(b: Float32Array, beta: Float32Array, W: Float32Array, d: number, n: number, sign = 1): Float32Array {
  const out = Float32Array.from(b);
  sgemm(false, false, 1, n, d, sign, beta, d, W, n, 1, out, n);
  return out;
}

/** One matrix or more of every layer, stacked into one float32 tensor [L, ...] in order. */
export function stackLayers<M>(layers: M[], get: (lm: M) => Mat64 | Mat64[]): Float32Array {
  const mats = layers.flatMap(get);
  const n = mats[0]?.data.length ?? 0;
  const out = new Float32Array(mats.length * n);
  mats.forEach((m, i) => out.set(m.data, i * n));
  return out;
}

export interface ObfuscatedModel {
  accelerator: AcceleratorWeights;
  /** without integrity vectors (the provider adds them) */
  enclave: ObfuscatedTensors;
}

const WEIGHT_NAMES: Record<LinearName, ['qkvw' | 'attprojw' | 'fcw' | 'fcprojw', 'qkvb' | 'attprojb' | 'fcb' | 'fcprojb']> = {
  qkv: ['qkvw', 'qkvb'], attproj: ['attprojw', 'attprojb'], fc: ['fcw', 'fcb'], fcproj: ['fcprojw', 'fcprojb'],
};

/** The layer norm whose affine part sealed mode folds into qkv and fc. */
const FOLDED_NORM = { qkv: ['ln1w', 'ln1b'], fc: ['ln2w', 'ln2b'] } as const;

/**
 * A block linear as its mode computes it before any mask: plain in paper mode; in sealed
 * mode qkv and fc take the layer norm's affine part (W' = diag(gamma) W, b' = beta W + b).
 */
export function effectiveLinear(w: GPT2Weights, mode: Mode, l: number, name: LinearName): { w: Float32Array; b: Float32Array } {
  const lay = w.layout, p = w.params, d = w.config.n_embd;
  const W = lay.layer(p, WEIGHT_NAMES[name][0], l), b = lay.layer(p, WEIGHT_NAMES[name][1], l);
  if (mode !== 'sealed' || name === 'attproj' || name === 'fcproj') return { w: Float32Array.from(W), b: Float32Array.from(b) };
  const n = name === 'qkv' ? 3 * d : 4 * d;
  const [g, be] = FOLDED_NORM[name];
  return { w: scaleRows(W, d, n, lay.layer(p, g, l)), b: foldBias(b, lay.layer(p, be, l), W, d, n) };
}

/**
 * The two sides of one layer's masks, W* = In W Out: `input` maps X [din, cols] (a weight's
 * rows, a low-rank factor U), `output` maps X [rows, dout] (a weight's columns, a bias, V).
 * With `inv`, the inverse maps (In^-1, Out^-1): W = In^-1 (Out^-1 applied to W*).
 */
export function maskSides(masks: ModelMasks, l: number, d: number, H: number, inv = false) {
  const lm = masks.layers[l];
  const hm = headMats(lm);
  const dh = d / H;
  const sealed = masks.params.mode === 'sealed';
  const Q = masks.Q ? f32(masks.Q.m) : null;
  const R = (m: LayerMasks['R1'], invert: boolean) => (m ? f32(invert ? m.inv : m.m) : null);
  const R1 = R(lm.R1, !inv), R2 = R(lm.R2, !inv), Ro = R(lm.Ro, inv), Rp = R(lm.Rp, inv), Qo = R(masks.Q, inv);
  return {
    input(name: LinearName, X: Float32Array, cols: number): Float32Array {
      switch (name) {
        case 'qkv': return sealed ? mm(Q!, X, d, d, cols, !inv) : mm(R1!, X, d, d, cols); // Q^T X or R1^-1 X (inverse: Q X, R1 X)
        case 'fc': return sealed ? mm(Q!, X, d, d, cols, !inv) : mm(R2!, X, d, d, cols); //   Q^T X or R2^-1 X
        case 'attproj': { const Y = new Float32Array(d * cols); headLeft(X, Y, cols, inv ? hm.B : hm.Binv, lm.headPerm, dh, inv); return Y; } // MB^-1 X
        case 'fcproj': return permuteRows(X, 4 * d, cols, lm.pi, inv); //  Pi^T X
      }
    },
    output(name: LinearName, X: Float32Array, rows: number): Float32Array {
      const right = sealed ? Qo : name === 'attproj' ? Ro : Rp;
      switch (name) {
        case 'qkv': return applyMqkv(X, rows, d, dh, lm, inv, hm); //    X Mqkv
        case 'fc': return permuteCols(X, rows, 4 * d, lm.pi, inv); //   X Pi
        default: return right ? mm(X, right, rows, d, d) : Float32Array.from(X); // X Q, X Ro / Rp, or X
      }
    },
  };
}

/** The delta kept in the enclave: D = W'p - W'b of every block linear (effective weights) as U V, and the bias difference. */
export interface DeltaSource {
  base: GPT2Weights;
  choice: RankChoice;
}

/** What the factorisation of the delta kept: per linear its rank, and ||D - U V||^2 and ||D||^2 summed over the model. */
export interface DeltaReport {
  ranks: Record<LinearName, number>[];
  residual: number;
  total: number;
}

/**
 * Applies the provider transform (design note, both modes). With `delta`, the accelerator's
 * linears are the masked public base and the enclave holds the masked low-rank delta:
 * U* = In U, V* = V Out, b* = (b'p - b'b) Out.
 */
export function obfuscate(w: GPT2Weights, masks: ModelMasks, onLayer?: (l: number) => void, delta?: DeltaSource): ObfuscatedModel & { deltaReport: DeltaReport | null } {
  const c = w.config;
  const { n_layer: L, n_embd: d, n_head: H } = c;
  const dh = d / H;
  const lay = w.layout;
  const p = w.params;
  const mode = masks.params.mode;
  const layers: Record<LinearName, ObfLinear>[] = [];
  const Q = masks.Q ? f32(masks.Q.m) : null;
  const deltas: DeltaTensors = [];
  const report: DeltaReport = { ranks: [], residual: 0, total: 0 };

  for (let l = 0; l < L; l++) {
    const sides = maskSides(masks, l, d, H);
    const rec = {} as Record<LinearName, ObfLinear>;
    const drec = {} as DeltaTensors[number];
    const ranks = {} as Record<LinearName, number>;
    for (const name of LINEARS) {
      const [din, dout] = linearDims(name, d);
      const own = effectiveLinear(w, mode, l, name);
      const acc = delta ? effectiveLinear(delta.base, mode, l, name) : own;
      rec[name] = { w: sides.output(name, sides.input(name, acc.w, dout), din), b: sides.output(name, acc.b, 1), din, dout };
      if (!delta) continue;
      const D = new Float64Array(din * dout);
      for (let i = 0; i < D.length; i++) D[i] = own.w[i] - acc.w[i];
      const svd = truncatedSvd(D, din, dout, delta.choice, 1000 * l + LINEARS.indexOf(name) + 1);
      let total = 0;
      for (let i = 0; i < D.length; i++) total += D[i] * D[i];
      report.residual += svd.residualEnergy * total;
      report.total += total;
      const r = ranks[name] = svd.rank;
      const db = new Float32Array(dout);
      for (let i = 0; i < dout; i++) db[i] = own.b[i] - acc.b[i];
      drec[name] = { rank: r, U: sides.input(name, Float32Array.from(svd.U), r), V: sides.output(name, Float32Array.from(svd.V), r), b: sides.output(name, db, 1) };
    }
    layers.push(rec);
    if (delta) { deltas.push(drec); report.ranks.push(ranks); }
    onLayer?.(l);
  }

  // per-head masks and the hidden permutation: LoRA (both modes) adds plain-space updates
  // into the masked q*, k*, v*, f* (O(n d d_h) per layer, no d x d product)
  const stack = (get: (lm: LayerMasks) => Mat64 | Mat64[]) => stackLayers(masks.layers, get);
  const heads: HeadMasks = {
    hA: stack((lm) => lm.A.map((x) => x.m)), hAinvT: stack((lm) => lm.A.map((x) => transpose(x.inv))),
    hB: stack((lm) => lm.B.map((x) => x.m)), hBinv: stack((lm) => lm.B.map((x) => x.inv)),
    headPerm: Int32Array.from(masks.layers.flatMap((lm) => [...lm.headPerm])), pi: Int32Array.from(masks.layers.flatMap((lm) => [...lm.pi])),
  };
  const copy = (k: 'wte' | 'wpe' | 'ln1w' | 'ln1b' | 'ln2w' | 'ln2b' | 'lnfw' | 'lnfb') => Float32Array.from(lay.view(p, k));
  const common = { ln1w: copy('ln1w'), ln1b: copy('ln1b'), ln2w: copy('ln2w'), ln2b: copy('ln2b'), chk: null, delta: delta ? deltas : null, ...heads };
  let enclave: ObfuscatedTensors;
  if (mode === 'sealed') {
    // u = Q^T 1 (centring vector)
    const u = new Float32Array(d), Qd = masks.Q!.m.data;
    for (let i = 0; i < d; i++) { let s = 0; for (let k = 0; k < d; k++) s += Qd[k * d + i]; u[i] = s; }
    // LoRA and the classifier train in the plain basis (exactly local training): the enclave
    // maps between it and the rotated stream with Q and the layer norms' affine part
    enclave = {
      mode: 'sealed', ...common, u, Q: Float32Array.from(Q!),
      wte: mm(lay.view(p, 'wte'), Q!, c.vocab_size, d, d),
      wpe: mm(lay.view(p, 'wpe'), Q!, c.n_ctx, d, d),
      // G = Q^T diag(gamma_f) Q ; head bias beta_f Q
      G: mm(Q!, scaleRows(Q!, d, d, lay.view(p, 'lnfw')), d, d, d, true),
      headBias: mm(lay.view(p, 'lnfb'), Q!, 1, d, d),
      score: w.cls ? mm(w.cls.weight, Q!, w.cls.numLabels, d, d) : undefined,
    };
  } else {
    const two = masks.params.twoSided;
    enclave = {
      mode: 'paper', ...common, wte: copy('wte'), wpe: copy('wpe'), lnfw: copy('lnfw'), lnfb: copy('lnfb'),
      R1: stack((lm) => lm.R1!.m), R2: stack((lm) => lm.R2!.m),
      RoInv: two ? stack((lm) => lm.Ro!.inv) : null, RpInv: two ? stack((lm) => lm.Rp!.inv) : null,
      score: w.cls ? Float32Array.from(w.cls.weight) : undefined,
    };
  }
  return { accelerator: { n_layer: L, layers }, enclave, deltaReport: delta ? report : null };
}

/** The accelerator's linears with the enclave's delta added (W* + U* V*, b* + db*): the factored model's masked linears. */
export function withDelta(acc0: AcceleratorWeights, delta: DeltaTensors): AcceleratorWeights {
  const acc = gpt2Linears(acc0, 'a public-base delta');
  if (delta.length !== acc.n_layer) throw new BundleError(`the enclave's delta has ${delta.length} layers, the accelerator's weights ${acc.n_layer}`);
  return {
    n_layer: acc.n_layer,
    layers: acc.layers.map((layer, l) => {
      const rec = {} as Record<LinearName, ObfLinear>;
      for (const name of LINEARS) {
        const a = layer[name], t = delta[l][name];
        const w = Float32Array.from(a.w), b = Float32Array.from(a.b);
        if (t.rank > 0) sgemm(false, false, a.din, a.dout, t.rank, 1, t.U, t.rank, t.V, a.dout, 1, w, a.dout);
        for (let i = 0; i < b.length; i++) b[i] += t.b[i];
        rec[name] = { ...a, w, b };
      }
      return rec;
    }),
  };
}

/**
 * Inverse of `obfuscate` (provider side): recovers plain GPT-2 weights from (possibly
 * fine-tuned) accelerator weights and enclave tensors. `base` is the provider's original
 * model: in sealed mode its layer-norm affine, folded into the weights, is unfolded again.
 * An enclave delta (public-base bundles) is added first: the result is the factored model.
 */
export function deobfuscate(base: GPT2Weights, acc0: AcceleratorWeights, enc: ObfuscatedTensors, masks: ModelMasks): GPT2Weights {
  const acc = gpt2Linears(enc.delta ? withDelta(acc0, enc.delta) : acc0, 'deobfuscate');
  const c = base.config;
  const { n_layer: L, n_embd: d, n_head: H } = c;
  const layout = new ParamLayout(c);
  const p = new Float32Array(layout.total);
  const mode = masks.params.mode;
  if (enc.mode !== mode) throw new BundleError(`the enclave tensors are ${enc.mode} mode, the masks ${mode} mode`);
  const QT = masks.Q ? f32(masks.Q.inv) : null;
  const bl = base.layout;
  const bp0 = base.params;
  for (let l = 0; l < L; l++) {
    const sides = maskSides(masks, l, d, H, true);
    for (const name of LINEARS) {
      const [din, dout] = linearDims(name, d);
      const a = acc.layers[l][name];
      let w = sides.input(name, sides.output(name, a.w, din), dout), b = sides.output(name, a.b, 1);
      if (mode === 'sealed' && (name === 'qkv' || name === 'fc')) {
        // the layer-norm affine folded into the weights is the base model's (it is not trained in sealed mode)
        const [g, be] = FOLDED_NORM[name].map((k) => bl.layer(bp0, k, l));
        for (let i = 0; i < d; i++) if (g[i] === 0) throw new Error(`layer ${l}: a layer-norm gain is exactly 0, the folded weights cannot be unfolded`);
        // W = diag(1/gamma) Q W* ; b = b* - beta W
        w = scaleRows(w, d, dout, g, true);
        b = foldBias(b, be, w, d, dout, -1);
      }
      layout.layer(p, WEIGHT_NAMES[name][0], l).set(w);
      layout.layer(p, WEIGHT_NAMES[name][1], l).set(b);
    }
    for (const k of ['ln1w', 'ln1b', 'ln2w', 'ln2b'] as const) layout.layer(p, k, l).set(mode === 'sealed' ? bl.layer(bp0, k, l) : enc[k].subarray(l * d, (l + 1) * d));
  }
  let cls = base.cls ? { ...base.cls } : undefined;
  if (enc.mode === 'sealed') {
    layout.view(p, 'wte').set(mm(enc.wte, QT!, c.vocab_size, d, d));
    layout.view(p, 'wpe').set(mm(enc.wpe, QT!, c.n_ctx, d, d));
    // gamma_f is folded into G (not trained); beta_f Q is the head bias
    layout.view(p, 'lnfw').set(bl.view(bp0, 'lnfw'));
    layout.view(p, 'lnfb').set(mm(enc.headBias, QT!, 1, d, d));
    if (cls && enc.score) cls = { ...cls, weight: mm(enc.score, QT!, cls.numLabels, d, d) };
  } else {
    for (const k of ['wte', 'wpe', 'lnfw', 'lnfb'] as const) layout.view(p, k).set(enc[k]);
    if (cls && enc.score) cls = { ...cls, weight: Float32Array.from(enc.score) };
  }
  return { config: c, layout, params: p, cls, padTokenId: base.padTokenId };
}
