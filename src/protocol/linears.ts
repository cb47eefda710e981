/**
 * What the accelerator holds: the obfuscated linear weights of every block, in the block's
 * own layout (y = x W + b with W [din, dout]), by the linear's name (`BlockLinearName`, one
 * family's names per model). The protocol's requests name a linear so; the accelerator
 * never sees anything else.
 */
import { ALL_LINEARS, LINEARS, type BlockLinearName, type LinearName } from '../model/block.js';
import type { BlockLinears, LinearSet, LinearWeights } from '../model/local_linears.js';
import type { TensorToWrite } from '../io/safetensors.js';
import { BundleError } from '../errors.js';

export type AcceleratorWeights = LinearSet<BlockLinearName>;
export type ObfLinear = LinearWeights;
export type LinearLayer = AcceleratorWeights['layers'][number];

/** The linears a layer holds, in block order. */
export function layerLinearNames(layer: LinearLayer): BlockLinearName[] {
  return ALL_LINEARS.filter((n) => layer[n] !== undefined);
}

/** Each linear's weight [din, dout] and bias [dout] as tensors `${prefix}.{l}.{name}.{w}` and `.{b}`, in bundle order. */
export function linearTensors(acc: AcceleratorWeights, prefix: string, [w, b] = ['weight', 'bias']): TensorToWrite[] {
  return acc.layers.flatMap((layer, l) => layerLinearNames(layer).flatMap((name): TensorToWrite[] => {
    const x = layer[name]!;
    return [
      { name: `${prefix}.${l}.${name}.${w}`, dtype: 'F32', shape: [x.din, x.dout], data: x.w },
      { name: `${prefix}.${l}.${name}.${b}`, dtype: 'F32', shape: [x.b.length], data: x.b },
    ];
  }));
}

/** One linear of a layer (a clear error when the layer lacks it). */
export function linearOf(layer: LinearLayer, name: BlockLinearName, l = -1): ObfLinear {
  const x = layer[name];
  if (!x) throw new BundleError(`the accelerator's weights have no linear ${l >= 0 ? `h.${l}.` : ''}${name}`);
  return x;
}

/** The weights as GPT-2's four linears per layer (refuses another family's). */
export function gpt2Linears(acc: AcceleratorWeights, what = 'this operation'): BlockLinears<LinearName> {
  for (const [l, layer] of acc.layers.entries()) {
    for (const n of LINEARS) if (!layer[n]) throw new BundleError(`${what} serves GPT-2 models; the accelerator's layer ${l} has no linear "${n}" (it holds ${layerLinearNames(layer).join(', ')})`);
  }
  return acc as BlockLinears<LinearName>;
}
