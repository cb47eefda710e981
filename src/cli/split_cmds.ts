/** CLI commands of the provider transform and split inference. */
import { Command, Option } from 'commander';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { saveCheckpoint, loadCheckpoint } from '../model/checkpoint.js';
import { parseMaskSpec } from '../linalg/masks.js';
import type { RotaryMasks } from '../obfuscate/enclave_tensors.js';
import { BUNDLE_DIRS, type ObfuscateOptions, obfuscateWeights, obfuscateLlamaWeights, writeObfuscation, deobfuscateDirs, deobfuscateLlamaDirs } from '../obfuscate/provider.js';
import { loadAcceleratorBundle, loadEnclaveBundle, checkBundlePair, type PublicBaseInfo } from '../obfuscate/bundle.js';
import { runFidelity, formatFidelity } from '../experiments/fidelity.js';
import { shareTable, type ShareRow } from '../obfuscate/share.js';
import { llamaShareTable } from '../obfuscate/share_llama.js';
import { Accelerator } from '../accelerator/accelerator.js';
import { InProcessLink } from '../protocol/link.js';
import { Enclave } from '../enclave/enclave.js';
import type { MixingConfig } from '../enclave/mixing.js';
import { progressBar } from './progress.js';
import { addMixingOptions, mixingOptionsOf } from './run_spec_args.js';
import { loadPlainModel, parseIntArg, refuseNonEmpty, addPublicBaseOptions, publicBaseOf, isLlamaDir, copyTokenizer } from './model_args.js';
import { loadLlamaCheckpoint, saveLlamaCheckpoint } from '../model/llama_checkpoint.js';
import type { LlamaWeights } from '../model/llama.js';
import type { GPT2Weights } from '../model/weights.js';
import { BundleError, InputError } from '../errors.js';
import { mergeAdapter, readAdapter } from '../train/session.js';
import { emit, textTable, withJson } from './output.js';

/**
 * The provider transform of a checkpoint directory of either family, with progress, written
 * to `out` (a Llama-family model's tokenizer goes into the enclave bundle: the enclave
 * tokenises the owner's data with it). `obfuscate` and `provider obfuscate` share it.
 */
export function obfuscateDir(model: string, out: string, label: string, o: Omit<ObfuscateOptions, 'onLayer'> & { rotary?: RotaryMasks }) {
  const llama = isLlamaDir(model);
  if (o.rotary && !llama) throw new InputError('--rotary-masks applies to Llama-family models; this is a GPT-2 checkpoint');
  const w = llama ? loadLlamaCheckpoint(model) : loadCheckpoint(model);
  const bar = progressBar(2 * w.config.n_layer, label, '{phase}');
  let done = 0;
  const opts = { ...o, onLayer: (phase: string) => bar.update(++done, { phase }) };
  const r = llama ? obfuscateLlamaWeights(w as LlamaWeights, opts) : obfuscateWeights(w as GPT2Weights, opts);
  bar.stop();
  const { acceleratorSha256 } = writeObfuscation(out, r);
  if (llama) copyTokenizer(model, path.join(out, 'enclave'));
  return { r, llama, acceleratorSha256 };
}

export function addSplitCommands(program: Command): void {
  withJson(addPublicBaseOptions(program
    .command('obfuscate')
    .description('provider transform: write an accelerator bundle (obfuscated linears only), an enclave bundle and the provider\'s secret mask key')
    .requiredOption('--model <dir>', 'plain Hugging Face checkpoint directory (GPT-2, or Llama, Mistral, Qwen2)')
    .addOption(new Option('--mode <mode>', 'obfuscation mode').choices(['sealed', 'paper']).default('sealed'))
    .addOption(new Option('--kappa <k>', 'condition number of the masks (1 = orthogonal)').default('1').conflicts('naive'))
    .option('--naive', 'paper\'s naive baseline: i.i.d. Gaussian masks (high condition number)')
    .option('--two-sided', 'paper mode: also mask the projection outputs')
    .option('--no-head-permutation', 'do not permute the heads')
    .option('--seed <n>', 'derive the mask key from a seed (reproducible, NOT secret; for tests)', parseIntArg('--seed'))
    .addOption(new Option('--rotary-masks <m>', 'Llama family: full per-head q/k masks unmasked in the enclave before rotary, or rotation-and-scale blocks that commute with it (docs/obfuscation.md)').choices(['full', 'blocks']))
    .requiredOption('--out <dir>', 'output directory (accelerator/, enclave/, provider/)')
    .option('--force', 'write into a non-empty --out (replacing its secret key: bundles made with the old one can then never be merged back)')))
    .action((o) => {
      const pub = publicBaseOf(o);
      const spec = o.naive ? parseMaskSpec('naive') : parseMaskSpec(String(o.kappa));
      if (o.twoSided && o.mode !== 'paper') throw new InputError('--two-sided masks the projection outputs in paper mode; give --mode paper');
      refuseNonEmpty(o.out, o.force, 'obfuscate', BUNDLE_DIRS);
      const { r, llama, acceleratorSha256 } = obfuscateDir(o.model, o.out, 'obfuscate', {
        mode: o.mode, spec, twoSided: o.twoSided, headPermutation: o.headPermutation, seed: o.seed, publicBase: pub, rotary: o.rotaryMasks,
      });
      emit({ out: o.out, mode: o.mode, kappa: o.naive ? 'naive' : String(o.kappa), family: llama ? 'llama' : 'gpt2', ...(llama ? { rotary_masks: o.rotaryMasks ?? 'full' } : {}), accelerator_sha256: acceleratorSha256, public_base: r.enclave.publicBase ?? null }, [
        `wrote ${path.join(o.out, 'accelerator')} (give to the cloud), ${path.join(o.out, 'enclave')} (encrypt to the attested enclave), ${path.join(o.out, 'provider')} (keep secret)`,
        `mode ${o.mode}, masks ${o.naive ? 'naive' : `kappa ${o.kappa}`}, accelerator manifest sha256 ${acceleratorSha256}`,
        ...(pub && r.enclave.publicBase ? [describeDelta(pub.dir, r.enclave.publicBase)] : []),
      ]);
    });

  withJson(program
    .command('deobfuscate')
    .description('provider side: merge (fine-tuned) bundles back into a plain Hugging Face checkpoint')
    .requiredOption('--base <dir>', 'the original plain checkpoint')
    .requiredOption('--bundles <dir>', 'directory with accelerator/, enclave/ and provider/ (or give them one by one)')
    .option('--accelerator <dir>', 'accelerator bundle (default: BUNDLES/accelerator)')
    .option('--enclave <dir>', 'enclave bundle (default: BUNDLES/enclave)')
    .option('--key <dir>', 'provider key (default: BUNDLES/provider)')
    .option('--adapter <dir>', 'also fold in a LoRA adapter: a PEFT adapter directory (its classifier too), a run\'s final/ or adapters file')
    .option('--public-base <dir>', 'check the public base the bundles pin (optional: the merge needs only the bundles)')
    .requiredOption('--out <dir>', 'output checkpoint directory')
    .option('--force', 'write into a non-empty --out')
    .addOption(new Option('--dtype <dtype>', 'storage dtype').choices(['F32', 'F16', 'BF16']).default('F32')))
    .action((o) => {
      refuseNonEmpty(o.out, o.force, 'deobfuscate');
      const dirs = [o.accelerator ?? path.join(o.bundles, 'accelerator'), o.enclave ?? path.join(o.bundles, 'enclave'), o.key ?? path.join(o.bundles, 'provider')] as const;
      if (isLlamaDir(o.base)) {
        if (o.adapter || o.publicBase) throw new InputError('--adapter and --public-base serve GPT-2 models; a Llama-family run\'s merged model is in its merged/ directory');
        const base = loadLlamaCheckpoint(o.base);
        saveLlamaCheckpoint(o.out, deobfuscateLlamaDirs(base, ...dirs), { dtype: o.dtype, arch: base.arch });
        copyTokenizer(o.base, o.out);
        return emit({ out: o.out, dtype: o.dtype, adapter: null }, `wrote plain checkpoint ${o.out}`);
      }
      const base = loadCheckpoint(o.base);
      const adapter = o.adapter ? readAdapter(o.adapter, base.config) : null;
      const pub = o.publicBase ? { weights: loadCheckpoint(o.publicBase), dir: o.publicBase } : undefined;
      const plain = deobfuscateDirs(base, ...dirs, pub);
      const w = adapter ? mergeAdapter(plain, adapter) : plain;
      saveCheckpoint(o.out, w, { dtype: o.dtype });
      emit({ out: o.out, dtype: o.dtype, adapter: adapter ? o.adapter : null }, `wrote plain checkpoint ${o.out}${adapter ? ` with the adapter ${o.adapter} merged` : ''}`);
    });

  addMixingOptions(program
    .command('fidelity')
    .description('split vs plain logits on the same tokens, for several mask condition numbers and the naive baseline')
    .requiredOption('--model <dir|preset>', 'checkpoint directory, or a preset with --random-init')
    .option('--random-init', 'use a random initialisation of the preset')
    .option('--seed <n>', 'seed for initialisation, tokens and masks', parseIntArg('--seed'), 1)
    .option('--tokens <n>', 'number of tokens', parseIntArg('--tokens'), 128)
    .addOption(new Option('--mode <mode>', 'obfuscation mode').choices(['sealed', 'paper']).default('paper'))
    .option('--kappas <list>', 'comma-separated kappas and/or "naive"', '1,10,100,1000,naive')
    .option('--two-sided', 'paper mode: two-sided masks')
    .addOption(new Option('--rotary-masks <m>', 'Llama family: full per-head q/k masks or rotation-and-scale blocks').choices(['full', 'blocks']))
    .option('--json', 'print JSON'))
    .action(async (o) => {
      const mixing = mixingOptionsOf(o, 'off');
      const specs = String(o.kappas).split(',').map((s: string) => parseMaskSpec(s.trim()));
      if (o.twoSided && o.mode !== 'paper') throw new InputError('--two-sided masks the projection outputs in paper mode; give --mode paper');
      const model = loadPlainModel(o.model, { randomInit: o.randomInit, seed: o.seed }).model;
      const name = o.randomInit ? o.model : path.basename(path.resolve(o.model));
      const bar = progressBar(o.mode === 'sealed' ? 1 : specs.length, 'fidelity', '{label}');
      const r = await runFidelity(model, name, { mode: o.mode, specs, tokens: o.tokens, seed: o.seed, twoSided: o.twoSided, mixing, rotary: o.rotaryMasks, onProgress: (i, _n, label) => bar.update(i, { label }) });
      bar.stop();
      emit(r, formatFidelity(r));
    });

  program
    .command('share')
    .description('enclave vs accelerator: parameters, secret state, FLOPs, boundary bytes and round trips for the GPT-2 presets, or the Llama ones (TinyLlama-1.1B, Llama-3.2-1B, Llama-2-7B; both rotary mask options)')
    .option('--seq <n>', 'sequence length', parseIntArg('--seq'), 512)
    .addOption(new Option('--family <f>', 'model family').choices(['gpt2', 'llama']).default('gpt2'))
    .option('--json', 'print JSON')
    .action((o) => {
      const rows = o.family === 'llama' ? llamaShareTable(o.seq) : shareTable(o.seq);
      emit({ seq: o.seq, rows }, formatShare(o.seq, rows));
    });
}

/** Loads an enclave + accelerator bundle pair and wires them in one process. */
export function loadSplit(encDir: string, accDir: string, mixing: MixingConfig | null = null): Enclave {
  if (!existsSync(encDir)) throw new BundleError(`enclave bundle ${encDir} not found`);
  if (!existsSync(accDir)) throw new BundleError(`accelerator bundle ${accDir} not found`);
  const enc = loadEnclaveBundle(encDir);
  const acc = loadAcceleratorBundle(accDir);
  checkBundlePair(enc, acc);
  return new Enclave(enc, new InProcessLink(new Accelerator(acc.weights)), { mixing });
}


/** One line on a public-base obfuscation: the pin, the ranks kept and the delta energy left out. */
export function describeDelta(dir: string, p: PublicBaseInfo): string {
  const ranks = p.ranks.flatMap((r) => Object.values(r));
  return `public base ${dir} (sha256 ${p.sha256.slice(0, 16)}...): the enclave keeps the delta at ${p.choice}, ranks ${Math.min(...ranks)}-${Math.max(...ranks)} (mean ${(ranks.reduce((a, x) => a + x, 0) / ranks.length).toFixed(1)}), ${(100 * p.residualEnergy).toFixed(2)}% of its energy left out`;
}

function formatShare(T: number, rows: ShareRow[]): string {
  const head = ['model', 'mode', 'enclave params', 'share', 'enclave state', 'of which masks', 'enclave FLOPs', 'boundary/token', 'trips/layer'];
  const fmtB = (b: number) => (b >= 1e9 ? `${(b / 1e9).toFixed(2)} GB` : `${(b / 1e6).toFixed(1)} MB`);
  const lines = rows.map((r) => [
    r.model, r.mode + (r.two_sided ? ' 2-sided' : '') + ('rotary' in r ? ` ${String(r.rotary)}` : ''), `${(r.enclave_params / 1e6).toFixed(1)}M / ${(r.params_total / 1e6).toFixed(0)}M`,
    `${(100 * r.enclave_param_share).toFixed(2)}%`, fmtB(r.enclave_state_bytes), fmtB(r.enclave_mask_bytes),
    `${(100 * r.enclave_flop_share).toFixed(2)}%`, `${(r.boundary_bytes_per_token / 1024).toFixed(0)} KiB`, String(r.round_trips_per_layer),
  ]);
  return [`sequence length ${T} (forward pass, per token)`, ...textTable(head, lines)].join('\n');
}
