/**
 * weight-alignment (public-base setting): the attacker holds the accelerator bundle and the
 * public checkpoint the provider fine-tuned. Every mask of a linear is a linear map of the
 * weights, so it can be solved for against the public weights.
 *
 * sealed (W* = Q^T diag(g) W M on the input side, W Q on the output side):
 *   1. MLP units: each hidden unit j has an input column a_j = Q^T x, an output row b_j = y Q
 *      and a bias; |a_j|, |b_j|, b_j a_j, the bias and the products with the output biases
 *      (rows bo Q, bp Q of every layer: v a_j = bo x, b_j v^T = y bo^T) are invariant under Q.
 *      Mutual nearest neighbours on those invariants give first anchors.
 *   2. Q: orthogonal Procrustes over the anchors of every layer (and the output biases
 *      bo Q, bp Q); then the units are matched again with Q (cosines of Q a_j and b_j Q^T
 *      against the public units), anchors refreshed, Q refit, until stable; the final
 *      permutation is a Hungarian assignment.
 *   3. heads: Q W*_qkv = diag(g) Wqkv Mqkv: for each masked slot and head, the per-head mask
 *      is fitted by least squares (or orthogonal Procrustes when the fit is orthogonal); the
 *      slot -> head assignment minimises the residuals.
 *   4. the plain (layer-norm-folded) weights follow: W = Q W* M^-1, Wo = B (W*_o Q^T), ...
 * paper, one-sided (W* = R^-1 W M, outputs plain): Pi from the plain rows of W*_fcproj, R2^-1
 * from W*_fc Pi^-1 = R2^-1 Wfc (least squares against the public Wfc), R1^-1 from
 * W*_v W*_o = R1^-1 Wv Wo (the head masks cancel), then the heads as above.
 */
import type { GPT2Weights } from '../model/weights.js';
import { gpt2Linears } from '../protocol/linears.js';
import type { BlockLinears } from '../model/local_linears.js';
import type { LoadedView, ViewTruth } from '../protocol/view.js';
import { InputError } from '../errors.js';
import {
  mat, transpose, matmul, polar, lstsq, inverse, relResidual, hungarian, unitRows, gemmABt, gemm, transpose32, block64, toF32, scaledDistances, type Mat64,
} from './linalg.js';
import { resultBase, type AttackProgress, type AttackResult } from './common.js';

/** Plain-basis weights of one block with the layer norm's affine part folded into qkv and fc (sealed), or plain (paper). */
export interface BlockWeights {
  qkvw: Float32Array; qkvb: Float32Array; //   [d, 3d], [3d]
  attprojw: Float32Array; attprojb: Float32Array; // [d, d], [d]
  fcw: Float32Array; fcb: Float32Array; //       [d, 4d], [4d]
  fcprojw: Float32Array; fcprojb: Float32Array; // [4d, d], [d]
}

const BLOCK_KEYS = ['qkvw', 'qkvb', 'attprojw', 'attprojb', 'fcw', 'fcb', 'fcprojw', 'fcprojb'] as const;

/** A model's block weights as the accelerator's plain twin holds them: folded for sealed mode (diag(g) W, beta W + b). */
export function blockWeightsOf(w: GPT2Weights, folded: boolean): BlockWeights[] {
  const d = w.config.n_embd, lay = w.layout, p = w.params;
  return Array.from({ length: w.config.n_layer }, (_, l) => {
    const b = Object.fromEntries(BLOCK_KEYS.map((k) => [k, Float32Array.from(lay.layer(p, k, l))])) as unknown as BlockWeights;
    if (folded) {
      for (const [W, bias, n, g, be] of [[b.qkvw, b.qkvb, 3 * d, lay.layer(p, 'ln1w', l), lay.layer(p, 'ln1b', l)], [b.fcw, b.fcb, 4 * d, lay.layer(p, 'ln2w', l), lay.layer(p, 'ln2b', l)]] as const) {
        for (let j = 0; j < n; j++) { let s = 0; for (let i = 0; i < d; i++) s += be[i] * W[i * n + j]; bias[j] += s; }
        for (let i = 0; i < d; i++) for (let j = 0; j < n; j++) W[i * n + j] *= g[i];
      }
    }
    return b;
  });
}

export interface Alignment {
  mode: 'sealed' | 'paper';
  /** sealed: the recovered residual basis Q [d, d] (h* = h Q) */
  Q: Float32Array | null;
  /** paper: the recovered R1^-1 of each layer [d, d] (a = a* R1^-1) */
  R1inv: Float32Array[] | null;
  /** recovered MLP permutation of each layer: slot j holds public unit perm[j] */
  perm: Int32Array[];
  /** recovered head permutation: slot j holds head headPerm[j] */
  headPerm: Int32Array[];
  /** the recovered plain (folded, in sealed mode) weights */
  weights: BlockWeights[];
  /** rounds of anchor refinement (sealed) */
  rounds: number;
  maskModel: ('orthogonal' | 'general')[];
}

/** rows [n, d] of unit-normalised similarity sum of two pairs of matrices, as [n, n] */
function simSum(pairs: [Float32Array, Float32Array][], n: number, d: number): Float32Array {
  const S = new Float32Array(n * n);
  for (const [A, B] of pairs) {
    const s = gemmABt(unitRows(A, n, d), unitRows(B, n, d), n, n, d);
    for (let i = 0; i < S.length; i++) S[i] += s[i];
  }
  return S;
}

/** pairs (j, k) that are each other's best match in S [n, n] */
function mutualBest(S: Float32Array, n: number): [number, number][] {
  const rowBest = new Int32Array(n), colBest = new Int32Array(n).fill(-1);
  const colVal = new Float64Array(n).fill(-Infinity);
  for (let j = 0; j < n; j++) {
    let b = 0;
    for (let k = 1; k < n; k++) if (S[j * n + k] > S[j * n + b]) b = k;
    rowBest[j] = b;
    for (let k = 0; k < n; k++) if (S[j * n + k] > colVal[k]) { colVal[k] = S[j * n + k]; colBest[k] = j; }
  }
  const out: [number, number][] = [];
  for (let j = 0; j < n; j++) if (colBest[rowBest[j]] === j) out.push([j, rowBest[j]]);
  return out;
}

function assignMax(S: Float32Array, n: number): Int32Array {
  const cost = new Float64Array(n * n);
  for (let i = 0; i < n * n; i++) cost[i] = -S[i];
  return hungarian(cost, n);
}

/** K += s t^T for unit s, t (d-vectors taken from rows) */
function addOuter(K: Float64Array, t: Float32Array, to: number, s: Float32Array, so: number, d: number): void {
  let ns = 0, nt = 0;
  for (let i = 0; i < d; i++) { ns += s[so + i] ** 2; nt += t[to + i] ** 2; }
  if (ns === 0 || nt === 0) return;
  const f = 1 / Math.sqrt(ns * nt);
  for (let i = 0; i < d; i++) {
    const ti = t[to + i] * f;
    for (let j = 0; j < d; j++) K[i * d + j] += ti * s[so + j];
  }
}

/** |M^T M - I|_F / sqrt(n): 0 for an orthogonal matrix */
function orthogonality(M: Mat64): number {
  const n = M.cols;
  const G = matmul(transpose(M), M);
  let e = 0;
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) e += (G.data[i * n + j] - (i === j ? 1 : 0)) ** 2;
  return Math.sqrt(e / n);
}

interface MaskFit { M: Mat64; Minv: Mat64; resid: number; orthogonal: boolean }

/** X [d, dh] ~ P [d, dh] M: least squares, or Procrustes when the least-squares mask is orthogonal */
function fitMask(P: Mat64, X: Mat64): MaskFit {
  const Mls = lstsq(P, X);
  if (orthogonality(Mls) < 0.25) {
    const Mo = polar(matmul(transpose(P), X));
    return { M: Mo, Minv: transpose(Mo), resid: relResidual(P, Mo, X), orthogonal: true };
  }
  return { M: Mls, Minv: inverse(Mls), resid: relResidual(P, Mls, X), orthogonal: false };
}

/**
 * Heads: Z [d, 3d] = (plain folded qkv) Mqkv in slot order. Returns the head permutation, the
 * recovered plain qkv weight and bias, and the v masks B_h (for the attention projection).
 */
function alignHeads(Z: Float32Array, zb: Float32Array, pub: BlockWeights, d: number, H: number): { headPerm: Int32Array; qkvw: Float32Array; qkvb: Float32Array; Bv: MaskFit[]; orthogonal: boolean; fits: MaskFit[][][] } {
  const dh = d / H;
  const fits: MaskFit[][][] = []; // [slot][head][section]
  const cost = new Float64Array(H * H);
  for (let j = 0; j < H; j++) {
    fits.push([]);
    for (let h = 0; h < H; h++) {
      const f: MaskFit[] = [];
      for (let s = 0; s < 3; s++) {
        const X = block64(Z, 3 * d, 0, d, s * d + j * dh, dh);
        const P = block64(pub.qkvw, 3 * d, 0, d, s * d + h * dh, dh);
        f.push(fitMask(P, X));
        cost[j * H + h] += f[s].resid;
      }
      fits[j].push(f);
    }
  }
  const headPerm = hungarian(cost, H);
  const qkvw = new Float32Array(d * 3 * d), qkvb = new Float32Array(3 * d);
  const Bv: MaskFit[] = new Array(H);
  let orth = true;
  for (let j = 0; j < H; j++) {
    const h = headPerm[j];
    for (let s = 0; s < 3; s++) {
      const f = fits[j][h][s];
      orth &&= f.orthogonal;
      const X = block64(Z, 3 * d, 0, d, s * d + j * dh, dh);
      const W = matmul(X, f.Minv);
      const b = matmul(block64(zb, 3 * d, 0, 1, s * d + j * dh, dh), f.Minv);
      for (let i = 0; i < d; i++) for (let c = 0; c < dh; c++) qkvw[i * 3 * d + s * d + h * dh + c] = W.data[i * dh + c];
      for (let c = 0; c < dh; c++) qkvb[s * d + h * dh + c] = b.data[c];
      if (s === 2) Bv[h] = f;
    }
  }
  return { headPerm, qkvw, qkvb, Bv, orthogonal: orth, fits };
}

/**
 * Wo [d, d] from W*o' = MB^-1 Wo (rows in slot order): slot j = B_h^-1 Wo_h. Each head's
 * B_h^-1 is fitted on its own against the public Wo_h (d equations per column, independent
 * of the input side): (W*o'_j)^T = Wo_h^T B_h^-T.
 */
function unmaskAttproj(Wo: Float32Array, headPerm: Int32Array, pubWo: Float32Array, d: number, H: number): Float32Array {
  const dh = d / H;
  const out = new Float32Array(d * d);
  for (let j = 0; j < H; j++) {
    const h = headPerm[j];
    const X = transpose(block64(Wo, d, j * dh, dh, 0, d)); //   d x dh
    const P = transpose(block64(pubWo, d, h * dh, dh, 0, d)); // d x dh
    const f = fitMask(P, X); // X ~ P M, M = B_h^-T
    const W = transpose(matmul(X, f.Minv)); //                  dh x d
    out.set(Float32Array.from(W.data), h * dh * d);
  }
  return out;
}

/** The sealed-mode alignment. */
function alignSealed(acc: BlockLinears, pub: BlockWeights[], d: number, H: number, maxRounds: number, progress?: AttackProgress): Alignment {
  const L = acc.n_layer;
  const n = 4 * d;
  // progress: the anchors of each layer, each round, the final assignment of each layer
  const tick = (done: number, label: string) => progress?.(done, 2 * L + maxRounds, label);
  // per layer: a rows (columns of W*fc), b rows (rows of W*p); public x rows, y rows
  const A = acc.layers.map((x) => transpose32(x.fc.w, d, n));
  const Bm = acc.layers.map((x) => x.fcproj.w);
  const X = pub.map((x) => transpose32(x.fcw, d, n));
  const Y = pub.map((x) => x.fcprojw);
  const norms = (M: Float32Array, i: number) => { let s = 0; for (let k = 0; k < d; k++) s += M[i * d + k] ** 2; return Math.sqrt(s); };
  const dotRows = (M1: Float32Array, M2: Float32Array, i: number) => { let s = 0; for (let k = 0; k < d; k++) s += M1[i * d + k] * M2[i * d + k]; return s; };
  // 1. invariant features -> first anchors. The output biases bo Q, bp Q of every layer are
  // rows that turn with Q like b_j, so v . a_j = bo . x and b_j . v = y . bo are invariant too.
  const vs: Float32Array[] = [], vp: Float32Array[] = [];
  for (let l = 0; l < L; l++) {
    vs.push(acc.layers[l].attproj.b, acc.layers[l].fcproj.b);
    vp.push(pub[l].attprojb, pub[l].fcprojb);
  }
  const NF = 4 + 2 * vs.length;
  const dotVec = (M: Float32Array, i: number, v: Float32Array) => { let s = 0; for (let k = 0; k < d; k++) s += M[i * d + k] * v[k]; return s; };
  let anchors: [number, number][][] = [];
  for (let l = 0; l < L; l++) {
    const fs = new Float64Array(n * NF), fp = new Float64Array(n * NF);
    for (let j = 0; j < n; j++) {
      fs.set([acc.layers[l].fc.b[j], norms(A[l], j), norms(Bm[l], j), dotRows(A[l], Bm[l], j), ...vs.map((v) => dotVec(A[l], j, v)), ...vs.map((v) => dotVec(Bm[l], j, v))], j * NF);
      fp.set([pub[l].fcb[j], norms(X[l], j), norms(Y[l], j), dotRows(X[l], Y[l], j), ...vp.map((v) => dotVec(X[l], j, v)), ...vp.map((v) => dotVec(Y[l], j, v))], j * NF);
    }
    anchors.push(mutualBest(Float32Array.from(scaledDistances(fs, fp, n, NF), (x) => -x), n));
    tick(l + 1, `invariants, layer ${l}`);
  }
  // 2. Procrustes on anchors, re-match, repeat; rows (Q a_j)^T = a_j^T Q^T and b_j Q^T, their similarities to the public units
  const turned = (l: number, Q: Float32Array) => {
    const Ah = gemm(A[l], Q, n, d, d, true), Bh = gemm(Bm[l], Q, n, d, d, true);
    return { Ah, Bh, S: simSum([[Ah, X[l]], [Bh, Y[l]]], n, d) };
  };
  let Q: Float32Array = new Float32Array(d * d);
  let rounds = 0;
  let prev = -1;
  for (; rounds < maxRounds; rounds++) {
    const K = new Float64Array(d * d);
    for (let l = 0; l < L; l++) {
      for (const [j, k] of anchors[l]) {
        addOuter(K, X[l], k * d, A[l], j * d, d); //  Q a_j ~ x_k
        addOuter(K, Y[l], k * d, Bm[l], j * d, d); // Q b_j^T ~ y_k^T
      }
      addOuter(K, pub[l].attprojb, 0, acc.layers[l].attproj.b, 0, d);
      addOuter(K, pub[l].fcprojb, 0, acc.layers[l].fcproj.b, 0, d);
    }
    Q = toF32(polar(mat(d, d, K))); // Q s ~ t: the bases' own Q (h* = h Q, W*fc = Q^T diag(g) Wfc Pi)
    anchors = A.map((_, l) => mutualBest(turned(l, Q).S, n));
    const total = anchors.reduce((t, a) => t + a.length, 0);
    tick(L + rounds + 1, `refinement round ${rounds + 1}, ${total} anchors`);
    if (total === prev) { rounds++; break; }
    prev = total;
  }
  // final permutations (Hungarian) and the plain weights
  const Qm = Q;
  const perm: Int32Array[] = [], headPerm: Int32Array[] = [], weights: BlockWeights[] = [];
  const maskModel: ('orthogonal' | 'general')[] = [];
  for (let l = 0; l < L; l++) {
    const a = acc.layers[l];
    const { Ah, Bh, S } = turned(l, Qm);
    const p = assignMax(S, n);
    perm.push(p);
    const fcw = new Float32Array(d * n), fcb = new Float32Array(n), fcprojw = new Float32Array(n * d);
    for (let j = 0; j < n; j++) {
      const k = p[j];
      for (let i = 0; i < d; i++) fcw[i * n + k] = Ah[j * d + i];
      fcb[k] = a.fc.b[j];
      fcprojw.set(Bh.subarray(j * d, (j + 1) * d), k * d);
    }
    // qkv: Z = Qm W*qkv = diag(g) Wqkv Mqkv
    const Z = gemm(Qm, a.qkv.w, d, 3 * d, d);
    const hd = alignHeads(Z, a.qkv.b, pub[l], d, H);
    headPerm.push(hd.headPerm);
    maskModel.push(hd.orthogonal ? 'orthogonal' : 'general');
    // attproj: W*o = MB^-1 Wo Q, so W*o Q^T = MB^-1 Wo
    const WoM = gemm(a.attproj.w, Qm, d, d, d, true);
    weights.push({
      qkvw: hd.qkvw, qkvb: hd.qkvb,
      attprojw: unmaskAttproj(WoM, hd.headPerm, pub[l].attprojw, d, H), attprojb: gemm(a.attproj.b, Qm, 1, d, d, true),
      fcw, fcb, fcprojw, fcprojb: gemm(a.fcproj.b, Qm, 1, d, d, true),
    });
    tick(L + maxRounds + l + 1, `assignment, layer ${l}`);
  }
  return { mode: 'sealed', Q: Qm, R1inv: null, perm, headPerm, weights, rounds, maskModel };
}

/** The paper-mode (one-sided) alignment. */
function alignPaper(acc: BlockLinears, pub: BlockWeights[], d: number, H: number, progress?: AttackProgress): Alignment {
  const L = acc.n_layer;
  const n = 4 * d;
  const perm: Int32Array[] = [], headPerm: Int32Array[] = [], weights: BlockWeights[] = [], R1inv: Float32Array[] = [];
  const maskModel: ('orthogonal' | 'general')[] = [];
  for (let l = 0; l < L; l++) {
    const a = acc.layers[l], P = pub[l];
    // Pi: the rows of W*p are plain rows of Wp, permuted
    const p = assignMax(simSum([[a.fcproj.w, P.fcprojw]], n, d), n);
    perm.push(p);
    const fcprojw = new Float32Array(n * d), fcb = new Float32Array(n), Wu = new Float32Array(d * n);
    for (let j = 0; j < n; j++) {
      fcprojw.set(a.fcproj.w.subarray(j * d, (j + 1) * d), p[j] * d);
      fcb[p[j]] = a.fc.b[j];
      for (let i = 0; i < d; i++) Wu[i * n + p[j]] = a.fc.w[i * n + j];
    }
    // R2^-1: Wu = R2^-1 Wfc  =>  Wu^T = Wfc^T R2^-T (least squares over the 4d rows)
    const R2invT = lstsq(block64(transpose32(P.fcw, d, n), d, 0, n, 0, d), block64(transpose32(Wu, d, n), d, 0, n, 0, d));
    const R2 = inverse(transpose(R2invT)); // (R2^-1)^-1
    const fcw = toF32(matmul(R2, block64(Wu, n, 0, d, 0, n)));
    // R1^-1 from W*v W*o = R1^-1 Wv Wo
    const vo = (qkvw: Float32Array, Wo: Float32Array) => {
      const V = new Float32Array(d * d);
      for (let i = 0; i < d; i++) V.set(qkvw.subarray(i * 3 * d + 2 * d, i * 3 * d + 3 * d), i * d);
      return gemm(V, Wo, d, d, d);
    };
    const Ms = vo(a.qkv.w, a.attproj.w), Mp = vo(P.qkvw, P.attprojw);
    // Ms = R1^-1 Mp  =>  Ms^T = Mp^T R1^-T
    // alternate: per-head masks given R1, then R1^-1 from all of W*qkv = R1^-1 (Wqkv Mqkv), a
    // far better conditioned system than W*v W*o alone. Two starts: the orthogonal Procrustes
    // fit of W*v W*o (right for kappa 1, stable however badly conditioned Wv Wo is) and its
    // ridge least-squares fit (general masks); the one whose heads fit best is kept.
    const Wq = block64(a.qkv.w, 3 * d, 0, d, 0, 3 * d);
    const WqT = transpose(Wq);
    const dh = d / H;
    const als = (start: Mat64) => {
      let R1i = start;
      let hd = alignHeads(toF32(matmul(inverse(R1i), Wq)), a.qkv.b, P, d, H);
      for (let it = 0; it < 4; it++) {
        const Tm = mat(d, 3 * d);
        for (let j = 0; j < H; j++) {
          const h = hd.headPerm[j];
          for (let s = 0; s < 3; s++) {
            const PM = matmul(block64(P.qkvw, 3 * d, 0, d, s * d + h * dh, dh), hd.fits[j][h][s].M);
            for (let i = 0; i < d; i++) for (let c = 0; c < dh; c++) Tm.data[i * 3 * d + s * d + j * dh + c] = PM.data[i * dh + c];
          }
        }
        R1i = transpose(lstsq(transpose(Tm), WqT));
        if (orthogonality(R1i) < 0.25) R1i = polar(matmul(Wq, transpose(Tm)));
        hd = alignHeads(toF32(matmul(inverse(R1i), Wq)), a.qkv.b, P, d, H);
      }
      let resid = 0;
      for (let j = 0; j < H; j++) for (let s = 0; s < 3; s++) resid += hd.fits[j][hd.headPerm[j]][s].resid;
      return { R1i, hd, resid };
    };
    const MsT = block64(transpose32(Ms, d, d), d, 0, d, 0, d), MpT = block64(transpose32(Mp, d, d), d, 0, d, 0, d);
    const fromPolar = als(polar(matmul(block64(Ms, d, 0, d, 0, d), transpose(block64(Mp, d, 0, d, 0, d)))));
    const fromLs = als(transpose(lstsq(MpT, MsT, 1e-3)));
    const { R1i, hd } = fromPolar.resid <= fromLs.resid ? fromPolar : fromLs;
    R1inv.push(toF32(R1i));
    headPerm.push(hd.headPerm);
    maskModel.push(hd.orthogonal ? 'orthogonal' : 'general');
    weights.push({
      qkvw: hd.qkvw, qkvb: hd.qkvb,
      attprojw: unmaskAttproj(a.attproj.w, hd.headPerm, P.attprojw, d, H), attprojb: Float32Array.from(a.attproj.b),
      fcw, fcb, fcprojw, fcprojb: Float32Array.from(a.fcproj.b),
    });
    progress?.(l + 1, L, `layer ${l}`);
  }
  return { mode: 'paper', Q: null, R1inv, perm, headPerm, weights, rounds: 0, maskModel };
}

export function alignWeights(view: LoadedView, publicBase: GPT2Weights, o: { maxRounds?: number; onProgress?: AttackProgress } = {}): Alignment {
  const h = view.header;
  if (h.mode !== 'sealed' && h.mode !== 'paper') throw new InputError(`weight-alignment needs a sealed or paper view; this one is ${h.mode} mode (plain weights: nothing to align)`);
  if (h.two_sided) throw new InputError('weight-alignment handles one-sided paper mode and sealed mode; this view is two-sided paper mode');
  const pub = blockWeightsOf(publicBase, h.mode === 'sealed');
  const acc = gpt2Linears(view.bundle(), 'weight-alignment');
  const { n_embd: d, n_head: H } = h.config;
  return h.mode === 'sealed' ? alignSealed(acc, pub, d, H, o.maxRounds ?? 12, o.onProgress) : alignPaper(acc, pub, d, H, o.onProgress);
}

const KINDS = ['qkvw', 'attprojw', 'fcw', 'fcprojw'] as const;

/** Relative error of recovered weights and the share of the provider's delta (W - W_public) recovered. */
export function scoreAlignment(al: Alignment, truth: BlockWeights[], pub: BlockWeights[]): Record<string, number> {
  let err = 0, nrm = 0, dd = 0, rr = 0, dr = 0, res = 0, base = 0;
  const per: Record<string, number> = {};
  for (const k of KINDS) {
    let e = 0, n0 = 0;
    truth.forEach((t, l) => {
      const W = t[k], R = al.weights[l][k], P = pub[l][k];
      for (let i = 0; i < W.length; i++) {
        const D = W[i] - P[i], Dr = R[i] - P[i];
        e += (R[i] - W[i]) ** 2; n0 += W[i] ** 2;
        dd += D * D; rr += Dr * Dr; dr += D * Dr; res += (Dr - D) ** 2; base += D * D;
      }
    });
    err += e; nrm += n0;
    per[`relative_error_${k}`] = Math.sqrt(e / n0);
  }
  return {
    relative_error: Math.sqrt(err / nrm),
    relative_error_public_guess: Math.sqrt(base / nrm),
    delta_cosine: dr / Math.sqrt(Math.max(dd * rr, 1e-300)),
    delta_energy_recovered: 1 - res / Math.max(dd, 1e-300),
    delta_relative_size: Math.sqrt(dd / nrm),
    ...per,
  };
}

export function permutationAccuracy(found: Int32Array[], truth: number[][] | null): number | null {
  if (!truth) return null;
  let ok = 0, n = 0;
  found.forEach((p, l) => { for (let j = 0; j < p.length; j++) { n++; if (p[j] === truth[l][j]) ok++; } });
  return ok / n;
}

/** The attack as a command: alignment, then the scores against the provider's true weights. */
export function weightAlignmentAttack(view: LoadedView, publicBase: GPT2Weights, truth: ViewTruth | null, providerModel: GPT2Weights | null, onProgress?: AttackProgress): AttackResult {
  const t0 = performance.now();
  const al = alignWeights(view, publicBase, { onProgress });
  const seconds = (performance.now() - t0) / 1000;
  const folded = view.header.mode === 'sealed';
  const pub = blockWeightsOf(publicBase, folded);
  const details: Record<string, unknown> = {
    seconds, rounds: al.rounds, mask_model: al.maskModel,
    mlp_permutation_accuracy: permutationAccuracy(al.perm, truth?.pi ?? null),
    head_permutation_accuracy: permutationAccuracy(al.headPerm, truth?.head_perm ?? null),
  };
  let value = NaN;
  if (providerModel) {
    const s = scoreAlignment(al, blockWeightsOf(providerModel, folded), pub);
    Object.assign(details, s);
    value = s.delta_energy_recovered;
  }
  return {
    ...resultBase(view, 'weight-alignment', 'public-base'),
    metric: 'delta_energy_recovered', value, baseline: 0, observed_batches: 0, details,
  };
}
