/**
 * What the accelerator holds: the obfuscated linear weights of every block, in the block's
 * own layout (`BlockLinears`, y = x W + b with W [din, dout]). The protocol's requests name a
 * linear by its `LinearName` (src/model/block.ts); the accelerator never sees anything else.
 */
import type { BlockLinears, LinearWeights } from '../model/local_linears.js';

export type AcceleratorWeights = BlockLinears;
export type ObfLinear = LinearWeights;
