/**
 * GPT-2 (Hugging Face's Conv1D orientation), a plain model (plain_model.ts) of THE block
 * (block.ts) with the plain layer-norm basis, the position table and the tied LM head.
 */
import { validateConfig, type GPT2Config } from './config.js';
import { ParamLayout, type ParamKind } from './params.js';
import type { GPT2Weights } from './weights.js';
import { LINEARS, linearDims, type LinearName } from './block.js';
import { linearViews } from './local_linears.js';
import { PlainBasis } from './plain_basis.js';
import { PlainModel, randomWeights, type FamilyParts } from './plain_model.js';

/** The parameter kinds of each block linear (weight, bias). */
export const LINEAR_KINDS: Record<LinearName, [ParamKind, ParamKind]> = {
  qkv: ['qkvw', 'qkvb'], attproj: ['attprojw', 'attprojb'], fc: ['fcw', 'fcb'], fcproj: ['fcprojw', 'fcprojb'],
};

export class GPT2 extends PlainModel<GPT2Config, GPT2Weights> {
  constructor(w: GPT2Weights) {
    super(w, validateConfig(w.config));
  }

  /** GPT-2 initialisation (normal 0.02, residual projections scaled by 1/sqrt(2L)), seeded. */
  static random(config: GPT2Config, seed: number, numLabels?: number): GPT2 {
    const projStd = 0.02 / Math.sqrt(2 * config.n_layer);
    return new GPT2(randomWeights(config, new ParamLayout(validateConfig(config)), seed, numLabels, (v, rng) => {
      rng.fillNormal(v('wte'), 0.02);
      rng.fillNormal(v('wpe'), 0.01);
      for (const k of ['ln1w', 'ln2w', 'lnfw'] as const) v(k).fill(1);
      rng.fillNormal(v('qkvw'), 0.02);
      rng.fillNormal(v('attprojw'), projStd);
      rng.fillNormal(v('fcw'), 0.02);
      rng.fillNormal(v('fcprojw'), projStd);
    }));
  }

  /** The layer-norm basis, the four linears, the token and position tables (the LM head tied to wte). */
  protected familyParts(p: Float32Array, g: Float32Array | null): FamilyParts {
    const lay = this.layout;
    const v = (buf: Float32Array, k: ParamKind) => lay.view(buf, k);
    const norms = (buf: Float32Array) => ({ ln1w: v(buf, 'ln1w'), ln1b: v(buf, 'ln1b'), ln2w: v(buf, 'ln2w'), ln2b: v(buf, 'ln2b'), lnfw: v(buf, 'lnfw'), lnfb: v(buf, 'lnfb') });
    return {
      basis: new PlainBasis(this.config, norms(p), g ? norms(g) : null),
      linearsOf: (buf) => linearViews(this.config.n_layer, LINEARS, (n) => linearDims(n, this.config.n_embd),
        (l, n) => [lay.layer(buf, LINEAR_KINDS[n][0], l), lay.layer(buf, LINEAR_KINDS[n][1], l)]),
      tables: { wte: v(p, 'wte'), wpe: v(p, 'wpe'), gwte: g ? v(g, 'wte') : null, gwpe: g ? v(g, 'wpe') : null },
    };
  }
}
