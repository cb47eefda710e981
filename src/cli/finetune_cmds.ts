/** CLI: fine-tuning through the split, evaluation and generation of fine-tuned runs. */
import { Command, Option } from 'commander';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { loadCheckpoint, saveCheckpoint } from '../model/checkpoint.js';
import type { GPT2Weights } from '../model/weights.js';
import { tokenizerFor } from '../model/tokenizer.js';
import { readJsonl, labelSet, encodeRecords, type Task } from '../data/jsonl.js';
import { buildSession, exportRun, mergedPlainModel, type SessionOptions } from '../train/session.js';
import { runFinetune, evaluate, type FinetuneConfig } from '../train/finetune.js';
import { DEFAULT_LORA, checkLoraTask, parseLoraTargets, validateLora } from '../model/lora.js';
import { parseMaskSpec, maskSpecLabel } from '../linalg/masks.js';
import { progressBar } from './progress.js';
import { parseIntArg, parseFloatArg } from './model_args.js';
import type { TrainMode, Method } from '../split/train_model.js';
import { BundleError, InputError } from '../errors.js';

export interface RunConfig {
  format: 'obfuscatune-run/1';
  model: string;
  task: Task;
  method: Method;
  mode: TrainMode;
  kappa: string | null;
  labels: string[];
  max_len: number;
  pad_token_id: number;
}

export function readRunConfig(runDir: string): RunConfig {
  const f = path.join(runDir, 'config.json');
  if (!existsSync(f)) throw new BundleError(`${runDir} is not a fine-tuning run directory (no config.json)`);
  const c = JSON.parse(readFileSync(f, 'utf8')) as RunConfig;
  if (c.format !== 'obfuscatune-run/1') throw new BundleError(`${f}: not a run configuration`);
  return c;
}

export function addFinetuneCommands(program: Command): void {
  program
    .command('finetune')
    .description('fine-tune through the enclave/accelerator split (or locally), with checkpoints and exact resume')
    .requiredOption('--model <dir>', 'plain Hugging Face GPT-2 checkpoint (the provider\'s model)')
    .requiredOption('--train <file>', 'training JSONL ({"text"}, {"prompt","completion"} or {"text","label"})')
    .option('--eval <file>', 'evaluation JSONL')
    .addOption(new Option('--task <task>', 'causal LM or sequence classification').choices(['lm', 'cls']).default('lm'))
    .addOption(new Option('--method <method>', 'LoRA adapters in the enclave, full fine-tuning, or local (plain full fine-tuning)').choices(['lora', 'full', 'local']).default('lora'))
    .addOption(new Option('--mode <mode>', 'split mode (local = no split)').choices(['sealed', 'paper', 'local']).default('sealed'))
    .option('--kappa <k>', 'mask condition number (paper mode; 1 = orthogonal)', '1')
    .option('--naive', 'naive Gaussian masks (paper mode)')
    .option('--two-sided', 'paper mode: mask the projection outputs too')
    .option('--steps <n>', 'optimisation steps', parseIntArg('--steps'), 100)
    .option('--batch <n>', 'examples per step', parseIntArg('--batch'), 8)
    .option('--max-len <n>', 'truncate examples to this many tokens (counted in the summary)', parseIntArg('--max-len'), 128)
    .option('--lr <x>', 'peak learning rate', parseFloatArg('--lr'), 1e-3)
    .option('--warmup <n>', 'warm-up steps', parseIntArg('--warmup'), 10)
    .option('--min-lr-frac <x>', 'cosine floor as a fraction of the peak', parseFloatArg('--min-lr-frac'), 0.1)
    .option('--clip <x>', 'global gradient-norm clip (0 = off)', parseFloatArg('--clip'), 1.0)
    .option('--weight-decay <x>', 'weight decay', parseFloatArg('--weight-decay'), 0)
    .addOption(new Option('--enclave-optimizer <name>', 'optimiser of enclave-side parameters').choices(['adamw', 'sgd']).default('adamw'))
    .option('--momentum <x>', 'SGD momentum (accelerator-side full fine-tuning)', parseFloatArg('--momentum'), 0.9)
    .option('--rank <r>', 'LoRA rank', parseIntArg('--rank'), DEFAULT_LORA.rank)
    .option('--alpha <a>', 'LoRA alpha', parseFloatArg('--alpha'), DEFAULT_LORA.alpha)
    .option('--dropout <p>', 'LoRA dropout', parseFloatArg('--dropout'), 0)
    .option('--targets <list>', 'LoRA targets: q,k,v,proj,fc,mlp-proj (or qkv, mlp), and wte (the token embedding; classification)', 'q,v')
    .addOption(new Option('--pooling <how>', 'classification: pool the last token (as HF GPT2ForSequenceClassification) or the mean of the tokens (a fresh head only)').choices(['last', 'mean']).default('last'))
    .option('--seed <n>', 'seed (data order, initialisation, dropout)', parseIntArg('--seed'), 1)
    .option('--mask-seed <n>', 'derive the masks from a seed (reproducible, NOT secret)', parseIntArg('--mask-seed'))
    .option('--eval-every <n>', 'evaluate every n steps (0 = only at the end)', parseIntArg('--eval-every'), 0)
    .option('--eval-batches <n>', 'cap on evaluation batches (0 = all)', parseIntArg('--eval-batches'), 0)
    .option('--checkpoint-every <n>', 'checkpoint every n steps', parseIntArg('--checkpoint-every'), 50)
    .option('--resume', 'continue the run in --out from its latest checkpoint')
    .option('--serialize', 'send every boundary message through the binary codec')
    .requiredOption('--out <dir>', 'run directory')
    .option('--json', 'print the summary as JSON')
    .action(async (o) => {
      const base = loadCheckpoint(o.model);
      const spec = o.naive ? 'naive' : maskSpecLabel(parseMaskSpec(String(o.kappa)));
      let mode: TrainMode = o.mode;
      let method: Method;
      if (o.method === 'local') { mode = 'local'; method = 'full'; } else method = o.method;
      if (mode !== 'paper' && (o.naive || (spec !== '1' && mode === 'local'))) throw new InputError('--kappa/--naive apply to paper (and sealed per-head) masks, not to local runs');
      const tok = tokenizerFor(base.config.vocab_size);
      const task: Task = o.task;
      const lora = method === 'lora' ? validateLora({ rank: o.rank, alpha: o.alpha, dropout: o.dropout, targets: parseLoraTargets(o.targets) }) : undefined;
      if (lora) checkLoraTask(lora, task);
      const trainRecs = readJsonl(o.train);
      const evalRecs = o.eval ? readJsonl(o.eval) : null;
      let labels: string[] = [];
      if (task === 'cls') {
        labels = labelSet(trainRecs, o.train);
        if (evalRecs) {
          const ev = labelSet(evalRecs, o.eval);
          const extra = ev.filter((l) => !labels.includes(l));
          if (extra.length) throw new InputError(`${o.eval} has labels not seen in ${o.train}: ${extra.join(', ')}`);
        }
      }
      if (o.maxLen > base.config.n_ctx - (task === 'lm' ? 0 : 0)) throw new InputError(`--max-len ${o.maxLen} exceeds the model's context of ${base.config.n_ctx}`);
      const train = encodeRecords(trainRecs, tok, { task, maxLen: o.maxLen, labels, source: o.train });
      const evalSet = evalRecs ? encodeRecords(evalRecs, tok, { task, maxLen: o.maxLen, labels, source: o.eval }) : null;
      const runDir = o.out;
      mkdirSync(runDir, { recursive: true });
      const padId = tok.eotId;
      const sessOpts: SessionOptions = {
        mode, method, task, kappa: spec, twoSided: o.twoSided, lora, numLabels: task === 'cls' ? labels.length : undefined, labels, pooling: o.pooling,
        padTokenId: padId, seed: o.seed, maskSeed: o.maskSeed ?? o.seed, acceleratorStateDir: path.join(runDir, 'accelerator-state'), serialize: o.serialize,
      };
      const session = buildSession(base, sessOpts);
      const cfg: FinetuneConfig = {
        task, method, mode, kappa: mode === 'local' ? null : spec, steps: o.steps, batch: o.batch, lr: o.lr, warmup: o.warmup,
        minLrFrac: o.minLrFrac, clip: o.clip, weightDecay: o.weightDecay, enclaveOptimizer: o.enclaveOptimizer, momentum: o.momentum,
        seed: o.seed, evalEvery: o.evalEvery, evalBatches: o.evalBatches, checkpointEvery: o.checkpointEvery, modelId: session.modelId,
      };
      const runCfg: RunConfig = { format: 'obfuscatune-run/1', model: path.resolve(o.model), task, method, mode, kappa: cfg.kappa, labels, max_len: o.maxLen, pad_token_id: padId };
      writeFileSync(path.join(runDir, 'config.json'), JSON.stringify({ ...runCfg, train: path.resolve(o.train), eval: o.eval ? path.resolve(o.eval) : null, options: { ...cfg, lora } }, null, 2) + '\n');
      if (train.truncated || (evalSet?.truncated ?? 0)) console.error(`note: truncated ${train.truncated} training and ${evalSet?.truncated ?? 0} evaluation records to ${o.maxLen} tokens`);
      const bar = progressBar(o.steps, `finetune ${mode}/${method}`, 'loss {loss} | {tps} tok/s');
      let toks = 0;
      let ms = 0;
      const summary = await runFinetune(session.model, train, evalSet, cfg, runDir, padId, {
        resume: o.resume, rng: session.rng,
        onStep: (m) => {
          toks += m.tokens;
          ms += m.ms;
          bar.update(m.step, { loss: m.loss.toFixed(4), tps: Math.round((toks / Math.max(ms, 1)) * 1000) });
        },
      });
      bar.stop();
      exportRun(path.join(runDir, 'final'), session, { kappa: cfg.kappa, labels });
      // this process plays every party: it can also act as the provider and merge the update
      const merged = mergedPlainModel(session);
      saveCheckpoint(path.join(runDir, 'merged'), { ...merged, cls: merged.cls ? { ...merged.cls, labels } : undefined, padTokenId: task === 'cls' ? padId : merged.padTokenId });
      const { losses, ...rest } = summary;
      const out = { ...rest, first_loss: losses[0] ?? null, model: path.resolve(o.model), labels: task === 'cls' ? labels : undefined };
      writeFileSync(path.join(runDir, 'summary.json'), JSON.stringify(out, null, 2) + '\n');
      if (o.json) console.log(JSON.stringify(out));
      else {
        const e = summary.eval;
        console.log(`${mode}/${method}${cfg.kappa ? ` (kappa ${cfg.kappa})` : ''}: ${o.steps} steps, last training loss ${summary.train_loss_last.toFixed(4)}, ${summary.tokens_per_second.toFixed(0)} tokens/s`);
        if (e) console.log(`eval: loss ${e.loss.toFixed(4)}${e.accuracy !== undefined ? `, accuracy ${(100 * e.accuracy).toFixed(2)}%` : ''}${e.perplexity !== undefined ? `, perplexity ${e.perplexity.toFixed(2)}` : ''} on ${e.examples} examples`);
        console.log(`run directory ${runDir} (metrics.jsonl, summary.json, checkpoints/, final/, merged/)`);
      }
    });

  program
    .command('eval')
    .description('evaluate a plain model on a text file, or a fine-tuned run on a JSONL dataset')
    .option('--model <dir>', 'plain checkpoint directory (with --text)')
    .option('--text <file>', 'UTF-8 text: perplexity of --model')
    .option('--run <dir>', 'fine-tuning run directory (with --data)')
    .option('--data <file>', 'JSONL dataset to evaluate the run on')
    .option('--seq <n>', 'tokens per window (--text)', parseIntArg('--seq'), 64)
    .option('--batch <n>', 'batch size', parseIntArg('--batch'), 8)
    .option('--json', 'print JSON')
    .action(async (o) => {
      if (o.run) {
        if (!o.data) throw new InputError('eval --run needs --data FILE');
        const rc = readRunConfig(o.run);
        const w = loadRunModel(o.run);
        const tok = tokenizerFor(w.config.vocab_size);
        const set = encodeRecords(readJsonl(o.data), tok, { task: rc.task, maxLen: rc.max_len, labels: rc.labels, source: o.data });
        const s = buildSession(w, { mode: 'local', method: 'full', task: rc.task, numLabels: rc.task === 'cls' ? rc.labels.length : undefined, padTokenId: rc.pad_token_id, seed: 0 });
        const e = await evaluate(s.model, set, o.batch, rc.pad_token_id);
        const res = { run: o.run, data: o.data, task: rc.task, ...e, truncated: set.truncated };
        if (o.json) console.log(JSON.stringify(res));
        else console.log(`loss ${e.loss.toFixed(4)}${e.accuracy !== undefined ? `, accuracy ${(100 * e.accuracy).toFixed(2)}%` : ''}${e.perplexity !== undefined ? `, perplexity ${e.perplexity.toFixed(2)}` : ''} on ${e.examples} examples`);
        return;
      }
      if (!o.model || !o.text) throw new InputError('give --model DIR --text FILE, or --run DIR --data FILE');
      const { GPT2 } = await import('../model/gpt2.js');
      const { evaluateLM } = await import('../train/lm.js');
      const model = new GPT2(loadCheckpoint(o.model));
      const tok = tokenizerFor(model.config.vocab_size);
      const e = await evaluateLM(model, Int32Array.from(tok.encode(readFileSync(o.text, 'utf8'))), o.seq, o.batch);
      if (o.json) console.log(JSON.stringify(e));
      else console.log(`loss ${e.loss.toFixed(4)}, perplexity ${e.perplexity.toFixed(2)} over ${e.tokens} tokens`);
    });
}

/** The merged plain model of a fine-tuning run. */
export function loadRunModel(runDir: string): GPT2Weights {
  readRunConfig(runDir);
  const dir = path.join(runDir, 'merged');
  if (!existsSync(dir)) throw new BundleError(`${runDir} has no merged model (was the run finished?)`);
  return loadCheckpoint(dir);
}
