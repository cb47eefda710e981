import type { GPT2Config } from './config.js';

/**
 * All GPT-2 parameters live in one contiguous Float32Array (and the gradients in a
 * second one with the same layout), as in llm.c. Per-layer tensors of one kind are
 * stacked: `qkvw` is `[L, C, 3C]`, layer `l` starts at `offset + l * C * 3C`.
 *
 * Weight matrices use the Hugging Face `Conv1D` layout, `in x out`, so a linear layer is
 * `y = x W + b` with `x` row-major `[tokens, in]`.
 */
export const one = (...layer: number[]) => ({ layer, per: false });
export const per = (...layer: number[]) => ({ layer, per: true });

/** GPT-2's tensors in buffer order: one layer's shape, and whether it is stacked over the layers. */
function gpt2Shapes(c: GPT2Config) {
  const { n_embd: C, n_ctx: T, vocab_size: V } = c;
  return {
    wte: one(V, C), // token embedding (tied with the LM head)
    wpe: one(T, C), // position embedding
    ln1w: per(C), ln1b: per(C),
    qkvw: per(C, 3 * C), qkvb: per(3 * C),
    attprojw: per(C, C), attprojb: per(C),
    ln2w: per(C), ln2b: per(C),
    fcw: per(C, 4 * C), fcb: per(4 * C),
    fcprojw: per(4 * C, C), fcprojb: per(C),
    lnfw: one(C), lnfb: one(C),
  };
}
export type ParamKind = keyof ReturnType<typeof gpt2Shapes>;

export interface ParamEntry<K extends string = ParamKind> {
  kind: K;
  /** Shape of the whole stacked tensor (per-layer kinds have a leading L). */
  shape: number[];
  /** Shape of one layer's slice (equal to `shape` for non-layer kinds). */
  layerShape: number[];
  perLayer: boolean;
  offset: number;
  size: number;
  /** Elements in one layer's slice. */
  layerSize: number;
}

/** One contiguous buffer of named tensors, per-layer kinds stacked [L, ...]. */
export class Layout<K extends string> {
  readonly entries: Record<K, ParamEntry<K>>;
  readonly total: number;

  /** `shapes` in buffer order (per: stacked over the layers) */
  constructor(readonly config: GPT2Config, shapes: Record<K, { layer: number[]; per: boolean }>) {
    const L = config.n_layer;
    let off = 0;
    const entries = {} as Record<K, ParamEntry<K>>;
    for (const kind of Object.keys(shapes) as K[]) {
      const s = shapes[kind];
      const layerSize = s.layer.reduce((a, b) => a * b, 1);
      const size = s.per ? layerSize * L : layerSize;
      entries[kind] = { kind, shape: s.per ? [L, ...s.layer] : s.layer, layerShape: s.layer, perLayer: s.per, offset: off, size, layerSize };
      off += size;
    }
    this.entries = entries;
    this.total = off;
  }

  /** View of a whole (stacked) tensor inside `buf`. */
  view(buf: Float32Array, kind: K): Float32Array {
    const e = this.entries[kind];
    return buf.subarray(e.offset, e.offset + e.size);
  }

  /** View of layer `l`'s slice of a per-layer tensor inside `buf`. */
  layer(buf: Float32Array, kind: K, l: number): Float32Array {
    const e = this.entries[kind];
    if (!e.perLayer) throw new Error(`${kind} is not a per-layer parameter`);
    if (l < 0 || l >= this.config.n_layer) throw new Error(`layer ${l} out of range [0, ${this.config.n_layer})`);
    const o = e.offset + l * e.layerSize;
    return buf.subarray(o, o + e.layerSize);
  }
}

export class ParamLayout extends Layout<ParamKind> {
  constructor(config: GPT2Config) {
    super(config, gpt2Shapes(config));
  }
}

/** Hugging Face tensor names (without the `transformer.` prefix; per-layer ones after `h.<layer>.`). */
const HF_NAMES: Record<ParamKind, string> = {
  wte: 'wte.weight', wpe: 'wpe.weight', ln1w: 'ln_1.weight', ln1b: 'ln_1.bias',
  qkvw: 'attn.c_attn.weight', qkvb: 'attn.c_attn.bias', attprojw: 'attn.c_proj.weight', attprojb: 'attn.c_proj.bias',
  ln2w: 'ln_2.weight', ln2b: 'ln_2.bias', fcw: 'mlp.c_fc.weight', fcb: 'mlp.c_fc.bias',
  fcprojw: 'mlp.c_proj.weight', fcprojb: 'mlp.c_proj.bias', lnfw: 'ln_f.weight', lnfb: 'ln_f.bias',
};

/** Every (HF name, kind, layer) triple of a config, in a stable order. */
export function hfTensorList(layout: ParamLayout): { name: string; kind: ParamKind; layer: number; shape: number[] }[] {
  const out: { name: string; kind: ParamKind; layer: number; shape: number[] }[] = [];
  for (const e of Object.values(layout.entries) as ParamEntry[]) {
    const kind = e.kind;
    if (!e.perLayer) out.push({ name: HF_NAMES[kind], kind, layer: -1, shape: e.shape });
    else for (let l = 0; l < layout.config.n_layer; l++) out.push({ name: `h.${l}.${HF_NAMES[kind]}`, kind, layer: l, shape: e.layerShape });
  }
  return out;
}

/** Parameter count of a config (without any classification head). */
export function paramCount(config: GPT2Config): number {
  return new ParamLayout(config).total;
}
