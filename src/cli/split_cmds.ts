/** CLI commands of the provider transform and split inference. */
import { Command, Option } from 'commander';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { saveCheckpoint, loadCheckpoint } from '../model/checkpoint.js';
import { parseMaskSpec } from '../linalg/masks.js';
import { obfuscateWeights, writeObfuscation, deobfuscateDirs } from '../obfuscate/provider.js';
import { loadAcceleratorBundle, loadEnclaveBundle, checkBundlePair } from '../obfuscate/bundle.js';
import { runFidelity, formatFidelity } from '../experiments/fidelity.js';
import { shareTable, formatShare } from '../obfuscate/share.js';
import { Accelerator } from '../accelerator/accelerator.js';
import { InProcessLink } from '../protocol/link.js';
import { Enclave } from '../enclave/enclave.js';
import type { MixingConfig } from '../enclave/mixing.js';
import { progressBar } from './progress.js';
import { addMixingOptions, mixingOptionsOf } from './run_spec_args.js';
import { loadModel, parseIntArg, refuseNonEmpty } from './model_args.js';
import { BundleError } from '../errors.js';

export function addSplitCommands(program: Command): void {
  program
    .command('obfuscate')
    .description('provider transform: write an accelerator bundle (obfuscated linears only), an enclave bundle and the provider\'s secret mask key')
    .requiredOption('--model <dir>', 'plain Hugging Face GPT-2 checkpoint directory')
    .addOption(new Option('--mode <mode>', 'obfuscation mode').choices(['sealed', 'paper']).default('sealed'))
    .option('--kappa <k>', 'condition number of the masks (1 = orthogonal)', '1')
    .option('--naive', 'paper\'s naive baseline: i.i.d. Gaussian masks (high condition number)')
    .option('--two-sided', 'paper mode: also mask the projection outputs')
    .option('--no-head-permutation', 'do not permute the heads')
    .option('--seed <n>', 'derive the mask key from a seed (reproducible, NOT secret; for tests)', parseIntArg('--seed'))
    .requiredOption('--out <dir>', 'output directory (accelerator/, enclave/, provider/)')
    .option('--force', 'write into a non-empty --out (replacing its secret key: bundles made with the old one can then never be merged back)')
    .action((o) => {
      refuseNonEmpty(o.out, o.force, 'obfuscate');
      const w = loadCheckpoint(o.model);
      const spec = o.naive ? parseMaskSpec('naive') : parseMaskSpec(String(o.kappa));
      const bar = progressBar(2 * w.config.n_layer, 'obfuscate', '{phase}');
      let done = 0;
      const r = obfuscateWeights(w, {
        mode: o.mode, spec, twoSided: o.twoSided, headPermutation: o.headPermutation, seed: o.seed,
        onLayer: (phase) => bar.update(++done, { phase }),
      });
      bar.stop();
      const { acceleratorSha256 } = writeObfuscation(o.out, r);
      console.log(`wrote ${path.join(o.out, 'accelerator')} (give to the cloud), ${path.join(o.out, 'enclave')} (encrypt to the attested enclave), ${path.join(o.out, 'provider')} (keep secret)`);
      console.log(`mode ${o.mode}, masks ${o.naive ? 'naive' : `kappa ${o.kappa}`}, accelerator manifest sha256 ${acceleratorSha256}`);
    });

  program
    .command('deobfuscate')
    .description('provider side: merge (fine-tuned) bundles back into a plain Hugging Face checkpoint')
    .requiredOption('--base <dir>', 'the original plain checkpoint')
    .requiredOption('--bundles <dir>', 'directory with accelerator/, enclave/ and provider/ (or give them one by one)')
    .option('--accelerator <dir>', 'accelerator bundle (default: BUNDLES/accelerator)')
    .option('--enclave <dir>', 'enclave bundle (default: BUNDLES/enclave)')
    .option('--key <dir>', 'provider key (default: BUNDLES/provider)')
    .requiredOption('--out <dir>', 'output checkpoint directory')
    .option('--force', 'write into a non-empty --out')
    .addOption(new Option('--dtype <dtype>', 'storage dtype').choices(['F32', 'F16', 'BF16']).default('F32'))
    .action((o) => {
      refuseNonEmpty(o.out, o.force, 'deobfuscate');
      const base = loadCheckpoint(o.base);
      const w = deobfuscateDirs(base, o.accelerator ?? path.join(o.bundles, 'accelerator'), o.enclave ?? path.join(o.bundles, 'enclave'), o.key ?? path.join(o.bundles, 'provider'));
      saveCheckpoint(o.out, w, { dtype: o.dtype });
      console.log(`wrote plain checkpoint ${o.out}`);
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
    .option('--json', 'print JSON'))
    .action(async (o) => {
      const mixing = mixingOptionsOf(o);
      const model = loadModel(o.model, { randomInit: o.randomInit, seed: o.seed });
      const specs = String(o.kappas).split(',').map((s: string) => parseMaskSpec(s.trim()));
      const name = o.randomInit ? o.model : path.basename(path.resolve(o.model));
      const bar = progressBar(o.mode === 'sealed' ? 1 : specs.length, 'fidelity', '{label}');
      const r = await runFidelity(model, name, { mode: o.mode, specs, tokens: o.tokens, seed: o.seed, twoSided: o.twoSided, mixing, onProgress: (i, _n, label) => bar.update(i, { label }) });
      bar.stop();
      console.log(o.json ? JSON.stringify(r) : formatFidelity(r));
    });

  program
    .command('share')
    .description('enclave vs accelerator: parameters, secret state, FLOPs, boundary bytes and round trips for the GPT-2 presets')
    .option('--seq <n>', 'sequence length', parseIntArg('--seq'), 512)
    .option('--json', 'print JSON')
    .action((o) => {
      const rows = shareTable(o.seq);
      console.log(o.json ? JSON.stringify({ seq: o.seq, rows }) : formatShare(o.seq, rows));
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

