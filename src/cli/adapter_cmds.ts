/** CLI: LoRA adapters in the Hugging Face PEFT format, out of a run and into a plain checkpoint. */
import type { Command } from 'commander';
import { Option } from 'commander';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { loadCheckpoint, saveCheckpoint } from '../model/checkpoint.js';
import { writePeftAdapter } from '../model/peft.js';
import { loadAdapters, mergeAdapter, readAdapter } from '../train/session.js';
import { BundleError } from '../errors.js';
import { refuseNonEmpty } from './model_args.js';
import { emit } from './output.js';
import { loadRunModel, readRunConfig } from './finetune_cmds.js';

export function addAdapterCommands(program: Command): void {
  const ad = program.command('adapter').description('LoRA adapters in the Hugging Face PEFT format (adapter_config.json + adapter_model.safetensors; docs/fine-tuning.md)');
  ad.command('export')
    .description('write the PEFT adapter directory of a LoRA fine-tuning run (runs write one to final/peft/ themselves; this also serves runs of earlier versions)')
    .argument('<run>', 'fine-tuning run directory')
    .requiredOption('--out <dir>', 'PEFT adapter directory to write')
    .option('--force', 'write into a non-empty --out')
    .option('--json', 'print the result as JSON on stdout')
    .action((run: string, o) => {
      refuseNonEmpty(o.out, o.force, 'adapter export');
      const rc = readRunConfig(run);
      const file = path.join(run, 'final', 'adapters.safetensors');
      if (rc.method !== 'lora' || !existsSync(file)) throw new BundleError(`${run}: no LoRA adapters (${file}); the run's method is ${rc.method}`);
      const merged = loadRunModel(run);
      const c = merged.config;
      writePeftAdapter(o.out, loadAdapters(file, c.n_layer, c.n_embd, c.vocab_size), { task: rc.task, baseModel: rc.model, score: rc.task === 'cls' ? merged.cls?.weight : undefined });
      emit({ out: o.out, base: rc.model }, `wrote PEFT adapter ${o.out} (base ${rc.model})`);
    });
  ad.command('merge')
    .description('fold a LoRA adapter (PEFT directory, a run\'s final/, or an adapters file) into a plain checkpoint, as PEFT\'s merge_and_unload; a saved classifier becomes the head')
    .requiredOption('--base <dir>', 'the plain checkpoint the adapter was trained on')
    .requiredOption('--adapter <dir>', 'the adapter')
    .requiredOption('--out <dir>', 'output checkpoint directory')
    .option('--force', 'write into a non-empty --out')
    .addOption(new Option('--dtype <dtype>', 'storage dtype').choices(['F32', 'F16', 'BF16']).default('F32'))
    .option('--json', 'print the result as JSON on stdout')
    .action((o) => {
      refuseNonEmpty(o.out, o.force, 'adapter merge');
      const base = loadCheckpoint(o.base);
      const a = readAdapter(o.adapter, base.config);
      saveCheckpoint(o.out, mergeAdapter(base, a), { dtype: o.dtype });
      const l = a.adapters.config;
      emit({ out: o.out, rank: l.rank, targets: l.targets, labels: a.score ? a.numLabels : null }, `wrote plain checkpoint ${o.out} (LoRA rank ${l.rank}, targets ${l.targets.join(',')}${a.score ? `, classifier of ${a.numLabels} labels` : ''})`);
    });
}
