/**
 * The trusted side (the TEE program) for inference. Holds the enclave bundle (embeddings,
 * layer-norm data, head, the masks it needs at run time), runs every non-linear operation
 * through THE block (src/model/block.ts) with its mode's basis, and sends only obfuscated
 * tensors to the accelerator through an `AcceleratorLink` (see src/enclave/bases.ts for what
 * each mode does around the linears).
 */
import type { GPT2Config } from '../model/config.js';
import type { Pooling } from '../model/kernels.js';
import { sgemm } from '../tensor/gemm.js';
import { Transformer, generate, type GenerateOptions, type KVCache } from '../model/transformer.js';
import { PlainBasis, type NormParams, type TrunkBasis } from '../model/plain_basis.js';
import type { Mode } from '../obfuscate/masks.js';
import type { EnclaveTensors } from '../obfuscate/transform.js';
import { requiredEnclaveTensors, type EnclaveBundle } from '../obfuscate/bundle.js';
import { Accelerator } from '../accelerator/accelerator.js';
import { InProcessLink } from '../protocol/link.js';
import type { ObfuscationResult } from '../obfuscate/provider.js';
import type { Obfuscated } from '../protocol/messages.js';
import type { AcceleratorLink } from '../protocol/link.js';
import { IntegrityChecker } from '../protocol/integrity.js';
import { RemoteLinears } from '../protocol/client.js';
import { PaperBasis, SealedBasis } from './bases.js';
import { headMasksOf, paperMasksOf, sealedParamsOf } from './tensors.js';
export class Enclave {
  readonly config: GPT2Config;
  readonly mode: Mode;
  private t: EnclaveTensors;
  /** Freivalds checks of every reply (when the bundle carries check vectors) */
  readonly integrity: IntegrityChecker | null;
  private readonly net: Transformer<Obfuscated>;

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
    const c = this.config;
    const get = (k: string) => this.t.get(k)!;
    let basis: TrunkBasis<Obfuscated>;
    if (bundle.mode === 'sealed') basis = new SealedBasis(c, sealedParamsOf(this.t), headMasksOf(this.t, c), false, null);
    else {
      const norms = Object.fromEntries((['ln1w', 'ln1b', 'ln2w', 'ln2b', 'lnfw', 'lnfb'] as const).map((k) => [k, get(k)])) as unknown as NormParams;
      basis = bundle.mode === 'paper' ? new PaperBasis(c, norms, null, paperMasksOf(this.t), headMasksOf(this.t, c)) : new PlainBasis(c, norms, null) as unknown as TrunkBasis<Obfuscated>;
    }
    this.net = new Transformer<Obfuscated>({
      config: c,
      basis,
      linears: new RemoteLinears(link, c, { trainWeights: false, integrity: this.integrity }),
      tables: { wte: get('wte'), wpe: get('wpe'), gwte: null, gwpe: null },
      cls: bundle.cls ? { numLabels: bundle.cls.numLabels, weight: this.plainScore(bundle.cls.numLabels), grad: null, pooling: bundle.cls.pooling ?? 'last' } : null,
    });
  }

  /** the classifier in the plain basis (sealed bundles hold it rotated: score Q) */
  private plainScore(K: number): Float32Array {
    const s = this.t.get('score')!;
    if (this.mode !== 'sealed') return s;
    const d = this.config.n_embd;
    const out = new Float32Array(K * d);
    sgemm(false, true, K, d, d, 1, s, d, this.t.get('Q')!, d, 0, out, d);
    return out;
  }

  /** LM logits [B,T,V] for a batch, computed through the split. */
  async forward(tokens: Int32Array, B: number, T: number): Promise<Float32Array> {
    return Float32Array.from((await this.net.forwardLM(tokens, B, T, null, false)).logits);
  }

  /** Classification logits [B, numLabels] (each row pooled as the head says: last non-pad token or mean). */
  async forwardCls(tokens: Int32Array, B: number, T: number, padId = this.bundle.padTokenId ?? -1): Promise<Float32Array> {
    const cls = this.bundle.cls;
    if (!cls) throw new Error('this enclave bundle has no classification head');
    return (await this.net.forwardCls(tokens, B, T, null, false, padId)).logits;
  }

  /** Logits of the last new position through the KV cache (masked k*, v* kept in the enclave). */
  forwardCached(cache: KVCache, tokens: ArrayLike<number>): Promise<Float32Array> {
    return this.net.forwardCached(cache, tokens);
  }

  /** Generation with a KV cache kept in the enclave: each new token costs one row per layer across the boundary. */
  generate(prompt: number[], opts: GenerateOptions): Promise<number[]> {
    return generate(this, prompt, opts);
  }
}

/** The two sides wired together in one process (tests, fidelity, local experiments). */
export function inProcessSplit(r: ObfuscationResult, opts: { serialize?: boolean } = {}) {
  const accelerator = new Accelerator(r.accelerator);
  const link = new InProcessLink(accelerator, opts);
  const enclave = new Enclave(r.enclave, link);
  return { accelerator, link, enclave };
}
