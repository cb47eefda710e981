/**
 * The trusted side (the TEE program). Holds the enclave bundle (embeddings, layer-norm
 * data, head, the masks it needs at run time), runs every non-linear operation, and sends
 * only obfuscated tensors to the accelerator through an `AcceleratorLink`.
 *
 * sealed: the residual stream lives in a secret orthogonal basis h* = h Q; layer-norm
 *   statistics are computed there (u = Q^T 1) and its affine part is folded into the
 *   accelerator's weights; the enclave does no d x d product per layer.
 * paper:  the residual stream is plain in the enclave; each linear input is masked
 *   explicitly (a* = LN(h) R1, a2* = LN2(h) R2), outputs come back plain (or masked by
 *   Ro/Rp with two-sided masks, unmasked here).
 */
import type { GPT2Config } from '../model/config.js';
import {
  encoderForward, layernormForward, geluForward, attentionForward, maskedNormForward, poolForward, type Pooling,
} from '../model/kernels.js';
import { cachedAttention } from '../model/generate.js';
import { sampleToken, type SampleOptions } from '../model/generate.js';
import { sgemm } from '../tensor/gemm.js';
import { Rng } from '../tensor/rng.js';
import type { Mode } from '../obfuscate/masks.js';
import type { EnclaveTensors, LinearName } from '../obfuscate/transform.js';
import { linearDims } from '../obfuscate/transform.js';
import { asObfuscated, type Obfuscated } from './messages.js';
import type { AcceleratorLink } from './link.js';
import { IntegrityChecker } from './integrity.js';

export interface EnclaveBundle {
  mode: Mode;
  config: GPT2Config;
  tensors: EnclaveTensors;
  /** mask spec label ("1", "10", "naive", ...) and two-sidedness, for reports */
  spec: string;
  twoSided: boolean;
  /** SHA-256 of the accelerator manifest this enclave bundle was made with */
  acceleratorManifestSha256: string;
  cls?: { numLabels: number; labels?: string[]; pooling?: Pooling };
  padTokenId?: number;
}

/** Which tensors each mode's enclave needs at run time, with their shapes. */
export function requiredEnclaveTensors(b: Pick<EnclaveBundle, 'mode' | 'config' | 'twoSided' | 'cls'>): Record<string, number[]> {
  const { n_layer: L, n_embd: d, n_ctx: T, vocab_size: V } = b.config;
  const H = b.config.n_head;
  const dh = d / H;
  const req: Record<string, number[]> = {
    wte: [V, d], wpe: [T, d], ln1w: [L, d], ln1b: [L, d], ln2w: [L, d], ln2b: [L, d],
    hA: [L, H, dh, dh], hAinvT: [L, H, dh, dh], hB: [L, H, dh, dh], hBinv: [L, H, dh, dh], headPerm: [L, H], pi: [L, 4 * d],
  };
  if (b.mode === 'sealed') {
    Object.assign(req, { u: [d], G: [d, d], headBias: [d], Q: [d, d] });
  } else {
    Object.assign(req, { lnfw: [d], lnfb: [d], R1: [L, d, d], R2: [L, d, d] });
    if (b.twoSided) Object.assign(req, { RoInv: [L, d, d], RpInv: [L, d, d] });
  }
  if (b.cls) req.score = [b.cls.numLabels, d];
  return req;
}

export class Enclave {
  readonly config: GPT2Config;
  readonly mode: Mode;
  private t: EnclaveTensors;
  /** Freivalds checks of every reply (when the bundle carries check vectors) */
  readonly integrity: IntegrityChecker | null;

  constructor(readonly bundle: EnclaveBundle, readonly link: AcceleratorLink) {
    this.config = bundle.config;
    this.mode = bundle.mode;
    this.t = bundle.tensors;
    const req = requiredEnclaveTensors(bundle);
    for (const [name, shape] of Object.entries(req)) {
      const x = this.t.get(name);
      const n = shape.reduce((a, b) => a * b, 1);
      if (!x) throw new Error(`enclave bundle (${bundle.mode} mode) lacks tensor "${name}"`);
      if (x.length !== n) throw new Error(`enclave tensor "${name}" has ${x.length} values, expected [${shape.join(', ')}]`);
      for (let i = 0; i < x.length; i++) if (!Number.isFinite(x[i])) throw new Error(`enclave tensor "${name}" contains a non-finite value at ${i}: refusing to run`);
    }
    this.integrity = this.t.has('chk.0.qkv.r') ? new IntegrityChecker(this.t, bundle.config.n_layer) : null;
  }

  private get(name: string): Float32Array {
    return this.t.get(name)!;
  }

  /** One obfuscated linear on the accelerator, with the reply's shape and values checked. */
  async linear(layer: number, name: LinearName, x: Obfuscated, rows: number): Promise<Float32Array> {
    const [din, dout] = linearDims(name, this.config.n_embd);
    if (x.length !== rows * din) throw new Error(`enclave: input of h.${layer}.${name} has ${x.length} values, expected ${rows} x ${din}`);
    const rep = await this.link.call({ op: 'linear_forward', layer, name, rows, x });
    if (rep.op === 'error') throw new Error(`accelerator refused h.${layer}.${name}: ${rep.message}`);
    if (rep.op !== 'tensor') throw new Error(`accelerator sent "${rep.op}" instead of a tensor for h.${layer}.${name}`);
    if (rep.rows !== rows || rep.cols !== dout || rep.data.length !== rows * dout) {
      throw new Error(`accelerator reply for h.${layer}.${name} has shape ${rep.rows} x ${rep.cols} (${rep.data.length} values), expected ${rows} x ${dout}`);
    }
    const y = rep.data;
    for (let i = 0; i < y.length; i++) if (!Number.isFinite(y[i])) throw new Error(`accelerator reply for h.${layer}.${name} contains a non-finite value at ${i}`);
    this.integrity?.checkForward(layer, name, x, y, rows);
    return y;
  }

  /** Masks a layer input for the accelerator: sealed -> normalised in the rotated basis; paper -> LN then R. */
  private maskInput(which: 1 | 2, l: number, h: Float32Array, n: number): Obfuscated {
    const { n_embd: d, layer_norm_epsilon: eps } = this.config;
    const out = new Float32Array(n * d);
    const mean = new Float32Array(n);
    const rstd = new Float32Array(n);
    if (this.mode === 'sealed') {
      maskedNormForward(out, mean, rstd, h, this.get('u'), n, d, eps);
      return asObfuscated(out);
    }
    const w = this.get(which === 1 ? 'ln1w' : 'ln2w').subarray(l * d, (l + 1) * d);
    const b = this.get(which === 1 ? 'ln1b' : 'ln2b').subarray(l * d, (l + 1) * d);
    layernormForward(out, mean, rstd, h, w, b, n, d, eps);
    const R = this.get(which === 1 ? 'R1' : 'R2').subarray(l * d * d, (l + 1) * d * d);
    const masked = new Float32Array(n * d);
    sgemm(false, false, n, d, d, 1, out, d, R, d, 0, masked, d);
    return asObfuscated(masked);
  }

  /** Adds an accelerator output (attention or MLP projection) to the residual stream. */
  private addResidual(which: 'o' | 'p', l: number, h: Float32Array, y: Float32Array, n: number): void {
    const d = this.config.n_embd;
    if (this.mode === 'paper' && this.bundle.twoSided) {
      const Rinv = this.get(which === 'o' ? 'RoInv' : 'RpInv').subarray(l * d * d, (l + 1) * d * d);
      sgemm(false, false, n, d, d, 1, y, d, Rinv, d, 1, h, d);
      return;
    }
    for (let i = 0; i < n * d; i++) h[i] += y[i];
  }

  private embed(tokens: Int32Array, B: number, T: number): Float32Array {
    const { n_embd: d, vocab_size: V, n_ctx } = this.config;
    if (T > n_ctx) throw new Error(`sequence length ${T} exceeds the model's context of ${n_ctx}`);
    for (let i = 0; i < B * T; i++) if (tokens[i] < 0 || tokens[i] >= V) throw new Error(`token id ${tokens[i]} at position ${i} is out of range [0, ${V})`);
    const h = new Float32Array(B * T * d);
    encoderForward(h, tokens, this.get('wte'), this.get('wpe'), B, T, d);
    return h;
  }

  /** The transformer trunk through the split; returns the final hidden state in the enclave's basis before the head. */
  private async trunk(tokens: Int32Array, B: number, T: number): Promise<Float32Array> {
    const { n_layer: L, n_embd: d, n_head: H } = this.config;
    const n = B * T;
    const h = this.embed(tokens, B, T);
    const att = new Float32Array(B * H * T * T);
    const o = new Float32Array(n * d);
    for (let l = 0; l < L; l++) {
      const qkv = await this.linear(l, 'qkv', this.maskInput(1, l, h, n), n);
      attentionForward(o, att, qkv, B, T, d, H); // on per-head masked q*, k*, v*: o* = o MB
      this.addResidual('o', l, h, await this.linear(l, 'attproj', asObfuscated(o), n), n);
      const f = await this.linear(l, 'fc', this.maskInput(2, l, h, n), n);
      geluForward(f, f, n * 4 * d); // element-wise, commutes with the hidden permutation
      this.addResidual('p', l, h, await this.linear(l, 'fcproj', asObfuscated(f), n), n);
    }
    return h;
  }

  /** Final layer norm (and in sealed mode the rotation back, folded into G): hidden states ready for the head. */
  private finalNorm(h: Float32Array, n: number): Float32Array {
    const { n_embd: d, layer_norm_epsilon: eps } = this.config;
    const out = new Float32Array(n * d);
    const mean = new Float32Array(n);
    const rstd = new Float32Array(n);
    if (this.mode === 'sealed') {
      const nf = new Float32Array(n * d);
      maskedNormForward(nf, mean, rstd, h, this.get('u'), n, d, eps);
      // hf* = nf* G + beta_f Q  (= LNf(h) Q)
      sgemm(false, false, n, d, d, 1, nf, d, this.get('G'), d, 0, out, d, this.get('headBias'));
    } else {
      layernormForward(out, mean, rstd, h, this.get('lnfw'), this.get('lnfb'), n, d, eps);
    }
    return out;
  }

  /** LM logits [B,T,V] for a batch, computed through the split. */
  async forward(tokens: Int32Array, B: number, T: number): Promise<Float32Array> {
    const { n_embd: d, vocab_size: V } = this.config;
    const n = B * T;
    const hf = this.finalNorm(await this.trunk(tokens, B, T), n);
    const logits = new Float32Array(n * V);
    sgemm(false, true, n, V, d, 1, hf, d, this.get('wte'), d, 0, logits, V);
    return logits;
  }

  /** Classification logits [B, numLabels] (each row pooled as the head says: last non-pad token or mean). */
  async forwardCls(tokens: Int32Array, B: number, T: number, padId = this.bundle.padTokenId ?? -1): Promise<Float32Array> {
    const cls = this.bundle.cls;
    if (!cls) throw new Error('this enclave bundle has no classification head');
    const d = this.config.n_embd;
    const hf = this.finalNorm(await this.trunk(tokens, B, T), B * T);
    const pooled = new Float32Array(B * d);
    poolForward(pooled, hf, tokens, B, T, d, padId, cls.pooling ?? 'last');
    const logits = new Float32Array(B * cls.numLabels);
    sgemm(false, true, B, cls.numLabels, d, 1, pooled, d, this.get('score'), d, 0, logits, cls.numLabels);
    return logits;
  }

  /**
   * Generation with a KV cache kept in the enclave (it holds the masked k*, v*). Each new
   * token costs one row per layer across the boundary.
   */
  async generate(prompt: number[], opts: SampleOptions & { maxNewTokens: number; seed?: number; stopToken?: number; onToken?: (id: number) => void }): Promise<number[]> {
    if (prompt.length === 0) throw new Error('generation needs a non-empty prompt');
    const { n_layer: L, n_embd: d, n_ctx } = this.config;
    const kc = new Float32Array(L * n_ctx * d);
    const vc = new Float32Array(L * n_ctx * d);
    let len = 0;
    const rng = new Rng(opts.seed ?? 0);
    const step = async (toks: number[]): Promise<Float32Array> => {
      const n = toks.length;
      if (len + n > n_ctx) throw new Error(`sequence of ${len + n} tokens exceeds the model's context of ${n_ctx}`);
      const ids = Int32Array.from(toks);
      const { vocab_size: V, n_head: H } = this.config;
      for (const t of toks) if (!Number.isInteger(t) || t < 0 || t >= V) throw new Error(`token id ${t} is out of range [0, ${V})`);
      const h = new Float32Array(n * d);
      const wte = this.get('wte'), wpe = this.get('wpe');
      for (let i = 0; i < n; i++) for (let j = 0; j < d; j++) h[i * d + j] = wte[ids[i] * d + j] + wpe[(len + i) * d + j];
      const o = new Float32Array(n * d);
      for (let l = 0; l < L; l++) {
        const qkv = await this.linear(l, 'qkv', this.maskInput(1, l, h, n), n);
        const K = kc.subarray(l * n_ctx * d, (l + 1) * n_ctx * d);
        const Vv = vc.subarray(l * n_ctx * d, (l + 1) * n_ctx * d);
        for (let i = 0; i < n; i++) {
          K.set(qkv.subarray(i * 3 * d + d, i * 3 * d + 2 * d), (len + i) * d);
          Vv.set(qkv.subarray(i * 3 * d + 2 * d, i * 3 * d + 3 * d), (len + i) * d);
        }
        cachedAttention(o, qkv, 3 * d, K, Vv, n, len, d, H);
        this.addResidual('o', l, h, await this.linear(l, 'attproj', asObfuscated(o), n), n);
        const f = await this.linear(l, 'fc', this.maskInput(2, l, h, n), n);
        geluForward(f, f, n * 4 * d);
        this.addResidual('p', l, h, await this.linear(l, 'fcproj', asObfuscated(f), n), n);
      }
      len += n;
      const hf = this.finalNorm(h.subarray((n - 1) * d, n * d), 1);
      const logits = new Float32Array(V);
      sgemm(false, true, 1, V, d, 1, hf, d, wte, d, 0, logits, V);
      return logits;
    };
    const out: number[] = [];
    let logits = await step(prompt);
    for (let i = 0; i < opts.maxNewTokens; i++) {
      const next = sampleToken(logits, rng, opts);
      if (opts.stopToken !== undefined && next === opts.stopToken) break;
      out.push(next);
      opts.onToken?.(next);
      if (len >= n_ctx) break;
      logits = await step([next]);
    }
    return out;
  }
}
