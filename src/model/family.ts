/**
 * A model's family, for code that serves every family: the names of its block linears (in
 * block order) and their dimensions.
 */
import { isLlama, type GPT2Config } from './config.js';
import { LINEARS, linearDims, type BlockLinearName, type LinearName } from './block.js';
import { LLAMA_LINEARS, llamaLinearDims, type LlamaLinearName } from './llama_block.js';

/** The block linears of a config's family, in the order a block calls them. */
export function blockLinearNames(c: GPT2Config): readonly BlockLinearName[] {
  return isLlama(c) ? LLAMA_LINEARS : LINEARS;
}

/** [d_in, d_out] of one of a config's block linears (refuses another family's name). */
export function blockLinearDims(c: GPT2Config, name: BlockLinearName): [number, number] {
  if (!blockLinearNames(c).includes(name)) throw new Error(`a ${isLlama(c) ? 'Llama-family' : 'GPT-2'} block has no linear "${name}" (it has ${blockLinearNames(c).join(', ')})`);
  return isLlama(c) ? llamaLinearDims(name as LlamaLinearName, c) : linearDims(name as LinearName, c.n_embd);
}
