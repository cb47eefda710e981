/**
 * The provider transform of the Llama family (docs/obfuscation.md, "Llama family"): plain
 * weights + masks derived from the key -> the accelerator's obfuscated linears and the
 * enclave's remainder, and back. Row-vector convention, W [d_in, d_out]:
 *
 *   qkv*    = In1 diag(g1) Wqkv Mqkv      Mqkv: per-head q (NH), k and v (NKV) masks, kv groups permuted
 *   o*      = Mv^-1 Wo Out1               Mv^-1: the v mask of each query head's group, on its rows
 *   gateup* = In2 diag(g2) [Wg Pi | Wu Pi] one permutation Pi for gate and up: silu(g Pi) * (u Pi) = (silu(g) * u) Pi
 *   down*   = Pi^T Wd Out2
 *
 * sealed: In = Q^T, Out = Q (the stream lives in h Q; the RMSNorm gains fold into the next
 * weights; diag(g) is 1 in paper mode). paper: In1 = R1^-1, In2 = R2^-1, Out = Ro / Rp
 * (two-sided) or I. Rotary: with `full` masks the enclave unmasks q and k per head before
 * rotary; with `blocks` the q mask of a group is a rotation-and-scale per rotary pair
 * (which commutes with the position rotations) and its keys carry the inverse transpose.
 */
import type { LlamaConfig } from '../model/config.js';
import { LlamaLayout, type LlamaWeights } from '../model/llama.js';
import { llamaDims, LLAMA_LINEARS, llamaLinearDims, type LlamaLinearName } from '../model/llama_block.js';
import { sgemm } from '../tensor/gemm.js';
import { KeyedRng, type RandomSource } from '../tensor/rng.js';
import { mat, transpose, type Mat64 } from '../linalg/mat64.js';
import { kappaMask, makeMask, randomPermutation, type MaskPair, type MaskSpec, type StreamFactory } from '../linalg/masks.js';
import type { ObfuscationParams } from './masks.js';
import type { AcceleratorWeights } from '../protocol/linears.js';
import type { LlamaHeadMasks, LlamaObfuscatedTensors, LlamaPlainTensors, RotaryMasks } from './enclave_tensors.js';
import { f32, mm, permuteCols, permuteRows, scaleRows, stackLayers } from './transform.js';
import { BundleError } from '../errors.js';

export interface LlamaLayerMasks {
  q: MaskPair[]; // [NH] by query head
  k: MaskPair[]; // [NKV] by key/value head
  v: MaskPair[]; // [NKV]
  /** masked kv slot j holds group headPerm[j]; query slot j rep + i holds head headPerm[j] rep + i */
  headPerm: Int32Array;
  /** MLP permutation of gate and up columns (and down's rows) */
  pi: Int32Array;
  R1?: MaskPair; R2?: MaskPair; Ro?: MaskPair; Rp?: MaskPair;
}

export interface LlamaModelMasks {
  params: ObfuscationParams;
  rotary: RotaryMasks;
  Q?: MaskPair;
  layers: LlamaLayerMasks[];
}

/**
 * A rotation-and-scale per rotary pair (p, p + hd/2): the 2 x 2 block [[a, b], [-b, a]],
 * a + ib = s e^{i phi}, commutes with every position rotation. s is log-uniform within
 * [kappa^-1/2, kappa^1/2] (the mask's condition number is at most kappa; naive: up to 100).
 */
export function pairMask(hd: number, spec: MaskSpec, rng: RandomSource): MaskPair {
  const h = hd / 2, m = mat(hd, hd), inv = mat(hd, hd);
  const lk = Math.log(spec.kind === 'kappa' ? spec.kappa : 100);
  for (let p = 0; p < h; p++) {
    const s = Math.exp(lk * (rng.uniform() - 0.5)), phi = 2 * Math.PI * rng.uniform();
    const set = (M: Mat64, a: number, b: number) => {
      M.data[p * hd + p] = a; M.data[p * hd + p + h] = b; M.data[(p + h) * hd + p] = -b; M.data[(p + h) * hd + p + h] = a;
    };
    set(m, s * Math.cos(phi), s * Math.sin(phi));
    set(inv, Math.cos(phi) / s, -Math.sin(phi) / s);
  }
  return { m, inv };
}

/** Every mask of a Llama-family model, from the key (labels of their own: no stream is shared with GPT-2's). */
export function deriveLlamaMasks(c: LlamaConfig, key: Buffer, params: ObfuscationParams, rotary: RotaryMasks = 'full', onLayer?: (l: number) => void): LlamaModelMasks {
  const root = new KeyedRng(key).derive('llama');
  const { C, hd, I } = llamaDims(c);
  const NH = c.n_head, NKV = c.n_kv_head, rep = NH / NKV;
  const streams = (label: string): StreamFactory => (part) => root.derive(`${label}/${part}`);
  const mask = (n: number, label: string) => makeMask(n, params.spec, streams(label));
  const out: LlamaModelMasks = { params, rotary, layers: [] };
  if (params.mode === 'sealed') out.Q = kappaMask(C, 1, streams('Q'));
  for (let l = 0; l < c.n_layer; l++) {
    const v = Array.from({ length: NKV }, (_, g) => mask(hd, `layer${l}/v${g}`));
    let q: MaskPair[], k: MaskPair[];
    if (rotary === 'blocks') {
      const A = Array.from({ length: NKV }, (_, g) => pairMask(hd, params.spec, root.derive(`layer${l}/pair${g}`)));
      q = Array.from({ length: NH }, (_, h) => A[Math.floor(h / rep)]);
      k = A.map((a) => ({ m: transpose(a.inv), inv: transpose(a.m) }));
    } else {
      q = Array.from({ length: NH }, (_, h) => mask(hd, `layer${l}/q${h}`));
      k = Array.from({ length: NKV }, (_, g) => mask(hd, `layer${l}/k${g}`));
    }
    const headPerm = params.headPermutation ? randomPermutation(NKV, root.derive(`layer${l}/heads`)) : Int32Array.from({ length: NKV }, (_, i) => i);
    const lm: LlamaLayerMasks = { q, k, v, headPerm, pi: randomPermutation(I, root.derive(`layer${l}/pi`)) };
    if (params.mode === 'paper') {
      lm.R1 = mask(C, `layer${l}/R1`);
      lm.R2 = mask(C, `layer${l}/R2`);
      if (params.twoSided) { lm.Ro = mask(C, `layer${l}/Ro`); lm.Rp = mask(C, `layer${l}/Rp`); }
    }
    out.layers.push(lm);
    onLayer?.(l);
  }
  return out;
}

const KIND = { qkv: 'qkvw', o: 'ow', gateup: 'guw', down: 'downw' } as const;

/** The (query head, kv group) of each masked slot of a layer: q slots [NH], kv slots [NKV]. */
function slots(c: LlamaConfig, perm: Int32Array): { q: Int32Array; kv: Int32Array } {
  const rep = c.n_head / c.n_kv_head;
  return { q: Int32Array.from({ length: c.n_head }, (_, s) => perm[Math.floor(s / rep)] * rep + (s % rep)), kv: perm };
}

/**
 * Per-head right products on a section of columns: dst[:, off + j hd] = src[:, off + heads[j] hd] M[heads[j]]
 * (toMasked), or dst[:, off + heads[j] hd] = src[:, off + j hd] M[heads[j]].
 */
function headCols(src: Float32Array, dst: Float32Array, rows: number, ld: number, off: number, heads: Int32Array, M: Float32Array[], hd: number, toMasked: boolean): void {
  heads.forEach((h, j) => {
    const [from, to] = toMasked ? [h, j] : [j, h];
    sgemm(false, false, rows, hd, hd, 1, src.subarray(off + from * hd), ld, M[h], hd, 0, dst.subarray(off + to * hd), ld);
  });
}

/**
 * The two sides of one layer's masks: `input` maps X [din, cols] (a weight's rows), `output`
 * X [rows, dout]. With `inv`, the inverse maps: W = In^-1 (Out^-1 applied to W*).
 */
function llamaSides(c: LlamaConfig, masks: LlamaModelMasks, l: number, inv = false) {
  const { C, hd, KV, W, I } = llamaDims(c);
  const lm = masks.layers[l];
  const sl = slots(c, lm.headPerm);
  const Q = masks.Q ? f32(masks.Q.m) : null;
  const sealed = masks.params.mode === 'sealed';
  const side = (ps: MaskPair[]) => ps.map((p) => f32(inv ? p.inv : p.m));
  const qM = side(lm.q), kM = side(lm.k), vM = side(lm.v);
  const rep = c.n_head / c.n_kv_head;
  // o's rows: Mv^-1 per query head's group, as (X^T Mv^-T)^T; the inverse Mv, as (X^T Mv^T)^T
  const vT = lm.v.map((p) => f32(transpose(inv ? p.m : p.inv)));
  const vOfQ = Array.from({ length: c.n_head }, (_, h) => vT[Math.floor(h / rep)]);
  const R = (m: MaskPair | undefined, invert: boolean) => (m ? f32(invert ? m.inv : m.m) : null);
  const R1 = R(lm.R1, !inv), R2 = R(lm.R2, !inv), Ro = R(lm.Ro, inv), Rp = R(lm.Rp, inv), Qo = R(masks.Q, inv);
  return {
    input(name: LlamaLinearName, X: Float32Array, cols: number): Float32Array {
      switch (name) {
        case 'qkv': return sealed ? mm(Q!, X, C, C, cols, !inv) : mm(R1!, X, C, C, cols); // Q^T X or R1^-1 X (inverse: Q X, R1 X)
        case 'gateup': return sealed ? mm(Q!, X, C, C, cols, !inv) : mm(R2!, X, C, C, cols);
        case 'o': { // row block of slot s: Mv(g)^-1 X[h block], per head
          const Xt = new Float32Array(cols * C), Yt = new Float32Array(cols * C);
          for (let i = 0; i < C; i++) for (let j = 0; j < cols; j++) Xt[j * C + i] = X[i * cols + j];
          headCols(Xt, Yt, cols, C, 0, sl.q, vOfQ, hd, !inv);
          const Y = new Float32Array(C * cols);
          for (let i = 0; i < C; i++) for (let j = 0; j < cols; j++) Y[i * cols + j] = Yt[j * C + i];
          return Y;
        }
        case 'down': return permuteRows(X, I, cols, lm.pi, inv); // Pi^T X
      }
    },
    output(name: LlamaLinearName, X: Float32Array, rows: number): Float32Array {
      if (X.length === 0) return X; // no bias
      switch (name) {
        case 'qkv': {
          const Y = new Float32Array(rows * W);
          headCols(X, Y, rows, W, 0, sl.q, qM, hd, !inv);
          headCols(X, Y, rows, W, C, sl.kv, kM, hd, !inv);
          headCols(X, Y, rows, W, C + KV, sl.kv, vM, hd, !inv);
          return Y;
        }
        case 'gateup': return permuteCols(X, 2 * rows, I, lm.pi, inv); // [g Pi | u Pi]: each half's columns
        default: {
          const M = sealed ? Qo : name === 'o' ? Ro : Rp;
          return M ? mm(X, M, rows, C, C) : Float32Array.from(X);
        }
      }
    },
  };
}

/** The linear as its mode computes it before any mask: in sealed mode qkv and gateup take the RMSNorm gain (diag(g) W). */
function effective(w: LlamaWeights, sealed: boolean, l: number, name: LlamaLinearName): { w: Float32Array; b: Float32Array } {
  const lay = w.layout, p = w.params, c = w.config;
  const [din, dout] = llamaLinearDims(name, c);
  const W = lay.layer(p, KIND[name], l), b = name === 'qkv' ? Float32Array.from(lay.layer(p, 'qkvb', l)) : new Float32Array(0);
  if (!sealed || name === 'o' || name === 'down') return { w: Float32Array.from(W), b };
  return { w: scaleRows(W, din, dout, lay.layer(p, name === 'qkv' ? 'ln1w' : 'ln2w', l)), b };
}

/** Every layer's linears, the effective weights through the masks' two sides (none: the `local` mode's plain linears). */
function llamaLinears(w: LlamaWeights, sealed: boolean, sidesOf?: (l: number) => ReturnType<typeof llamaSides>, onLayer?: (l: number) => void): AcceleratorWeights {
  const c = w.config;
  const layers = Array.from({ length: c.n_layer }, (_, l) => {
    const sides = sidesOf?.(l), rec: AcceleratorWeights['layers'][number] = {};
    for (const name of LLAMA_LINEARS) {
      const [din, dout] = llamaLinearDims(name, c), e = effective(w, sealed, l, name);
      rec[name] = sides ? { w: sides.output(name, sides.input(name, e.w, dout), din), b: sides.output(name, e.b, 1), din, dout } : { ...e, din, dout };
    }
    onLayer?.(l);
    return rec;
  });
  return { n_layer: c.n_layer, layers };
}

/** The enclave's per-head masks, by original head (f32), with the permutations. */
function headTensors(masks: LlamaModelMasks): LlamaHeadMasks {
  const stack = (get: (lm: LlamaLayerMasks) => MaskPair[], inv: boolean) => stackLayers(masks.layers, (lm) => get(lm).map((x) => (inv ? x.inv : x.m)));
  return {
    qM: stack((lm) => lm.q, false), qMinv: stack((lm) => lm.q, true),
    kM: stack((lm) => lm.k, false), kMinv: stack((lm) => lm.k, true),
    vM: stack((lm) => lm.v, false), vMinv: stack((lm) => lm.v, true),
    headPerm: Int32Array.from(masks.layers.flatMap((lm) => [...lm.headPerm])), pi: Int32Array.from(masks.layers.flatMap((lm) => [...lm.pi])),
    rotary: masks.rotary,
  };
}

export interface LlamaObfuscatedModel {
  accelerator: AcceleratorWeights;
  /** without integrity vectors (the provider adds them) */
  enclave: LlamaObfuscatedTensors;
}

/** The provider transform of a Llama-family model (both modes). */
export function obfuscateLlama(w: LlamaWeights, masks: LlamaModelMasks, onLayer?: (l: number) => void): LlamaObfuscatedModel {
  const c = w.config, { C } = llamaDims(c), V = c.vocab_size, lay = w.layout, p = w.params;
  const sealed = masks.params.mode === 'sealed';
  const accelerator = llamaLinears(w, sealed, (l) => llamaSides(c, masks, l), onLayer);
  const copy = (k: 'wte' | 'ln1w' | 'ln2w' | 'lnfw' | 'head') => Float32Array.from(lay.view(p, k));
  const untied = !c.tie_word_embeddings;
  const common = { family: 'llama' as const, ln1w: copy('ln1w'), ln2w: copy('ln2w'), chk: null, ...headTensors(masks) };
  let enclave: LlamaObfuscatedTensors;
  if (sealed) {
    const Q = f32(masks.Q!.m);
    const rot = (x: Float32Array, rows: number) => mm(x, Q, rows, C, C);
    enclave = {
      ...common, mode: 'sealed', Q, G: mm(Q, scaleRows(Q, C, C, lay.view(p, 'lnfw')), C, C, C, true),
      wte: rot(lay.view(p, 'wte'), V), head: untied ? rot(lay.view(p, 'head'), V) : null,
      score: w.cls ? rot(w.cls.weight, w.cls.numLabels) : undefined,
    };
  } else {
    const two = masks.params.twoSided, stack = (get: (lm: LlamaLayerMasks) => Mat64) => stackLayers(masks.layers, get);
    enclave = {
      ...common, mode: 'paper', wte: copy('wte'), head: untied ? copy('head') : null, lnfw: copy('lnfw'),
      R1: stack((lm) => lm.R1!.m), R2: stack((lm) => lm.R2!.m),
      RoInv: two ? stack((lm) => lm.Ro!.inv) : null, RpInv: two ? stack((lm) => lm.Rp!.inv) : null,
      score: w.cls ? Float32Array.from(w.cls.weight) : undefined,
    };
  }
  return { accelerator, enclave };
}

/**
 * Inverse of `obfuscateLlama` (provider side): plain weights from (possibly fine-tuned)
 * accelerator weights and enclave tensors. `base` gives sealed mode's folded RMSNorm gains.
 */
export function deobfuscateLlama(base: LlamaWeights, acc: AcceleratorWeights, enc: LlamaObfuscatedTensors, masks: LlamaModelMasks): LlamaWeights {
  const c = base.config, { C } = llamaDims(c), V = c.vocab_size;
  if (enc.mode !== masks.params.mode) throw new BundleError(`the enclave tensors are ${enc.mode} mode, the masks ${masks.params.mode} mode`);
  const sealed = enc.mode === 'sealed';
  const layout = new LlamaLayout(c), p = new Float32Array(layout.total);
  const get = (l: number, n: LlamaLinearName) => {
    const x = acc.layers[l][n];
    if (!x) throw new BundleError(`deobfuscate: the accelerator's layer ${l} has no linear "${n}" (not a Llama-family bundle)`);
    return x;
  };
  for (let l = 0; l < c.n_layer; l++) {
    const sides = llamaSides(c, masks, l, true);
    for (const name of LLAMA_LINEARS) {
      const [din, dout] = llamaLinearDims(name, c);
      const x = get(l, name);
      // undo the output side, then the input side (and in sealed mode the folded RMSNorm gain)
      const w = sides.input(name, sides.output(name, x.w, din), dout);
      const g = sealed && (name === 'qkv' || name === 'gateup') ? base.layout.layer(base.params, name === 'qkv' ? 'ln1w' : 'ln2w', l) : null;
      layout.layer(p, KIND[name], l).set(g ? scaleRows(w, C, dout, g, true) : w);
      if (name === 'qkv' && c.qkv_bias) layout.layer(p, 'qkvb', l).set(sides.output(name, x.b, 1));
    }
    for (const k of ['ln1w', 'ln2w'] as const) layout.layer(p, k, l).set(sealed ? base.layout.layer(base.params, k, l) : enc[k].subarray(l * C, (l + 1) * C));
  }
  const unrot = (x: Float32Array, rows: number) => (sealed ? mm(x, f32(masks.Q!.inv), rows, C, C) : Float32Array.from(x));
  layout.view(p, 'wte').set(unrot(enc.wte, V));
  if (!c.tie_word_embeddings) {
    if (!enc.head) throw new BundleError('deobfuscate: the model has an untied LM head, the enclave tensors none');
    layout.view(p, 'head').set(unrot(enc.head, V));
  }
  layout.view(p, 'lnfw').set(enc.mode === 'sealed' ? base.layout.view(base.params, 'lnfw') : enc.lnfw);
  const cls = base.cls && enc.score ? { ...base.cls, weight: unrot(enc.score, base.cls.numLabels) } : base.cls;
  return { config: c, layout, params: p, cls, padTokenId: base.padTokenId };
}


/** Plain Llama weights arranged as the two sides of the `local` mode (nothing masked). */
export function plainLlamaParts(w: LlamaWeights): { accelerator: AcceleratorWeights; tensors: LlamaPlainTensors } {
  const c = w.config, lay = w.layout, p = w.params;
  const copy = (k: 'wte' | 'ln1w' | 'ln2w' | 'lnfw' | 'head') => Float32Array.from(lay.view(p, k));
  return {
    accelerator: llamaLinears(w, false),
    tensors: {
      family: 'llama', mode: 'local', wte: copy('wte'), head: c.tie_word_embeddings ? null : copy('head'), ln1w: copy('ln1w'), ln2w: copy('ln2w'), lnfw: copy('lnfw'),
      score: w.cls ? Float32Array.from(w.cls.weight) : undefined, chk: null,
    },
  };
}

/** The RMSNorm-folded equivalent (block gains moved into qkv and gateup, set to 1): sealed full fine-tuning's plain twin. */
export function foldRmsGains(w: LlamaWeights): LlamaWeights {
  const c = w.config, lay = w.layout, p = Float32Array.from(w.params), { C, W, I } = llamaDims(c);
  for (let l = 0; l < c.n_layer; l++) {
    for (const [g, k, n] of [['ln1w', 'qkvw', W], ['ln2w', 'guw', 2 * I]] as const) {
      const gam = lay.layer(p, g, l), M = lay.layer(p, k, l);
      for (let i = 0; i < C; i++) for (let j = 0; j < n; j++) M[i * n + j] *= gam[i];
      gam.fill(1);
    }
  }
  return { ...w, params: p, cls: w.cls ? { ...w.cls, weight: Float32Array.from(w.cls.weight) } : undefined };
}

/** Plain weights from the `local` mode's two sides (a run's trained state). */
export function fromPlainLlamaParts(base: LlamaWeights, acc: AcceleratorWeights, t: LlamaPlainTensors): LlamaWeights {
  const c = base.config, layout = new LlamaLayout(c), p = new Float32Array(layout.total);
  acc.layers.forEach((L, l) => {
    for (const name of LLAMA_LINEARS) {
      const x = L[name];
      if (!x) throw new BundleError(`the accelerator's layer ${l} has no linear "${name}"`);
      layout.layer(p, KIND[name], l).set(x.w);
      if (name === 'qkv' && c.qkv_bias) layout.layer(p, 'qkvb', l).set(x.b);
    }
  });
  for (const k of ['wte', 'ln1w', 'ln2w', 'lnfw'] as const) layout.view(p, k).set(t[k]);
  if (t.head) layout.view(p, 'head').set(t.head);
  const cls = base.cls && t.score ? { ...base.cls, weight: Float32Array.from(t.score) } : base.cls;
  return { config: c, layout, params: p, cls, padTokenId: base.padTokenId };
}
