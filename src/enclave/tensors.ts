/**
 * The enclave bundle's tensors (stored by name) as the typed parameter structures of each
 * basis. Permutations are stored as float32 in bundles and become integer arrays here,
 * checked to be permutations.
 */
import type { GPT2Config } from '../model/config.js';
import type { EnclaveTensors } from '../obfuscate/transform.js';
import type { HeadMasks, PaperMasks, SealedParams } from './bases.js';

function need(t: EnclaveTensors, name: string, size?: number): Float32Array {
  const x = t.get(name);
  if (!x) throw new Error(`enclave bundle lacks tensor "${name}"`);
  if (size !== undefined && x.length !== size) throw new Error(`enclave tensor "${name}" has ${x.length} values, expected ${size}`);
  return x;
}

/** Integer permutations of `width` per row, from a float32 tensor [rows, width]. */
export function permutationsOf(name: string, x: Float32Array, rows: number, width: number): Int32Array {
  if (x.length !== rows * width) throw new Error(`enclave tensor "${name}" has ${x.length} values, expected ${rows} x ${width}`);
  const out = new Int32Array(x.length);
  const seen = new Uint8Array(width);
  for (let r = 0; r < rows; r++) {
    seen.fill(0);
    for (let j = 0; j < width; j++) {
      const v = x[r * width + j];
      if (!Number.isInteger(v) || v < 0 || v >= width || seen[v]) throw new Error(`enclave tensor "${name}" row ${r} is not a permutation of 0..${width - 1}`);
      seen[v] = 1;
      out[r * width + j] = v;
    }
  }
  return out;
}

/** The per-head masks and the hidden permutation, or null when the bundle has none. */
export function headMasksOf(t: EnclaveTensors, c: GPT2Config): HeadMasks | null {
  if (!t.has('hA')) return null;
  const { n_layer: L, n_head: H, n_embd: C } = c;
  const dh = C / H;
  const m = L * H * dh * dh;
  return {
    hA: need(t, 'hA', m), hAinvT: need(t, 'hAinvT', m), hB: need(t, 'hB', m), hBinv: need(t, 'hBinv', m),
    headPerm: permutationsOf('headPerm', need(t, 'headPerm'), L, H),
    pi: permutationsOf('pi', need(t, 'pi'), L, 4 * C),
  };
}

export function paperMasksOf(t: EnclaveTensors): PaperMasks {
  return { R1: need(t, 'R1'), R2: need(t, 'R2'), RoInv: t.get('RoInv') ?? null, RpInv: t.get('RpInv') ?? null };
}

export function sealedParamsOf(t: EnclaveTensors): SealedParams {
  return {
    Q: need(t, 'Q'), u: need(t, 'u'), G: need(t, 'G'), headBias: need(t, 'headBias'),
    ln1w: need(t, 'ln1w'), ln1b: need(t, 'ln1b'), ln2w: need(t, 'ln2w'), ln2b: need(t, 'ln2b'),
  };
}
