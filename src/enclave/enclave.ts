/**
 * The trusted side (the TEE program) for inference. Holds the enclave bundle (embeddings,
 * layer-norm data, head, the masks it needs at run time), runs every non-linear operation
 * through THE block (src/model/block.ts) with its mode's basis, and sends only obfuscated
 * tensors to the accelerator through an `AcceleratorLink` (see src/enclave/bases.ts for what
 * each mode does around the linears).
 */
import { isLlama, type GPT2Config, type LlamaConfig } from '../model/config.js';
import type { BlockDef, Linears } from '../model/block.js';
import { llamaBlock } from '../model/llama_block.js';
import { LlamaPaperBasis, LlamaSealedBasis } from './llama_bases.js';
import { Transformer, generate, type GenerateOptions, type KVCache } from '../model/transformer.js';
import type { Mode } from '../obfuscate/masks.js';
import type { EnclaveBundle } from '../obfuscate/bundle.js';
import { Accelerator } from '../accelerator/accelerator.js';
import { InProcessLink } from '../protocol/link.js';
import type { ObfuscationResult } from '../obfuscate/provider.js';
import type { LlamaObfuscatedTensors, ObfuscatedTensors } from '../obfuscate/enclave_tensors.js';
import type { Obfuscated } from '../protocol/messages.js';
import type { AcceleratorLink } from '../protocol/link.js';
import { IntegrityChecker } from '../protocol/integrity.js';
import { RemoteLinears } from '../protocol/client.js';
import { PaperBasis, SealedBasis } from './bases.js';
import { withEnclaveDelta } from './delta.js';
import { MixedLinears, type MixingConfig } from './mixing.js';
import type { KeyedRng } from '../tensor/rng.js';
import { BundleError } from '../errors.js';

export class Enclave {
  readonly config: GPT2Config;
  readonly mode: Mode;
  /** Freivalds checks of every reply (when the bundle carries check vectors) */
  readonly integrity: IntegrityChecker | null;
  private readonly net: Transformer<Obfuscated>;

  /** the token mixing of every call (null: off) */
  readonly mixing: MixedLinears | null;

  /** `bundle` as loaded (and checked) by loadEnclaveBundle, or as an obfuscation made it; `o.mixing`: per-call token mixing */
  constructor(readonly bundle: EnclaveBundle, readonly link: AcceleratorLink, o: { mixing?: MixingConfig | null; mixingRng?: KeyedRng } = {}) {
    const c = this.config = bundle.config;
    const t = bundle.tensors;
    this.mode = bundle.mode;
    if (t.mode !== bundle.mode) throw new BundleError(`enclave bundle: the manifest says ${bundle.mode} mode, its tensors are ${t.mode} mode`);
    if (bundle.cls && !t.score) throw new BundleError(`enclave bundle (${t.mode} mode) lacks tensor "score"`);
    const llama = 'family' in t;
    if (llama !== isLlama(c)) throw new BundleError(`enclave bundle: a ${isLlama(c) ? 'Llama-family' : 'GPT-2'} config with ${llama ? 'Llama-family' : 'GPT-2'} tensors`);
    this.integrity = t.chk ? new IntegrityChecker(t.chk, undefined, (_l, name) => !isLlama(c) || (name === 'qkv' && c.qkv_bias)) : null;
    const basis = 'family' in t
      ? (t.mode === 'sealed' ? new LlamaSealedBasis(c as LlamaConfig, t, false) : new LlamaPaperBasis(c as LlamaConfig, t, null))
      : (t.mode === 'sealed' ? new SealedBasis(c, t, false, null) : new PaperBasis(c, t, null));
    const cls = bundle.cls;
    const remote = new RemoteLinears(link, c, { trainWeights: false, integrity: this.integrity });
    this.mixing = o.mixing ? new MixedLinears(remote, c, { ...o.mixing, trainWeights: false, rng: o.mixingRng }) : null;
    this.net = new Transformer<Obfuscated>({
      config: c,
      basis,
      linears: withEnclaveDelta((this.mixing ?? remote) as Linears<Obfuscated>, 'family' in t ? null : t.delta) as Linears<Obfuscated, string>,
      block: isLlama(c) ? llamaBlock<Obfuscated>(c) as BlockDef<Obfuscated, string> : undefined,
      tables: 'family' in t ? { wte: t.wte, wpe: null, gwte: null, gwpe: null, head: t.head } : { wte: t.wte, wpe: t.wpe, gwte: null, gwpe: null },
      // the classifier in the plain basis (sealed bundles hold it rotated: score Q)
      cls: cls ? { numLabels: cls.numLabels, weight: basis.headToPlain(t.score!, cls.numLabels), grad: null, pooling: cls.pooling ?? 'last' } : null,
    });
  }

  /** LM logits [B,T,V] for a batch, computed through the split. */
  async forward(tokens: Int32Array, B: number, T: number): Promise<Float32Array> {
    return Float32Array.from((await this.net.forwardLM(tokens, B, T, null, false)).logits);
  }

  /** Classification logits [B, numLabels] (each row pooled as the head says: last non-pad token or mean). */
  async forwardCls(tokens: Int32Array, B: number, T: number, padId = this.bundle.padTokenId ?? -1): Promise<Float32Array> {
    if (!this.bundle.cls) throw new Error('this enclave bundle has no classification head');
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
export function inProcessSplit(r: ObfuscationResult<ObfuscatedTensors | LlamaObfuscatedTensors>, opts: { serialize?: boolean; mixing?: MixingConfig | null; mixingRng?: KeyedRng } = {}) {
  const accelerator = new Accelerator(r.accelerator);
  const link = new InProcessLink(accelerator, opts);
  const enclave = new Enclave(r.enclave, link, opts);
  return { accelerator, link, enclave };
}
