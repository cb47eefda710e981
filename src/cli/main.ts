/** The `obfuscatune` command line. */
import { Command, CommanderError, Option } from 'commander';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { readJsonl, DEFAULT_FIELDS } from '../io/jsonl.js';
import { mergeRunSpecInputs, readRunSpec } from '../train/run_spec.js';
import { inferenceInput } from '../train/predict.js';
import { getPreset, presetNames, LLAMA_PRESETS } from '../model/config.js';
import { GPT2 } from '../model/gpt2.js';
import { saveCheckpoint } from '../model/checkpoint.js';
import { generate } from '../model/transformer.js';
import { tokenizerFor } from '../model/tokenizer.js';
import { backendName, availableBackends, nativeInfo } from '../tensor/gemm.js';
import { benchGemm, formatGemmBench } from '../bench/gemm.js';
import { benchTrainStep, formatTrainStep, machineLabel } from '../bench/train_step.js';
import { trainLM, evaluateLM } from '../train/lm.js';
import { progressBar } from './progress.js';
import { loadPlainModel, numberList, parseIntArg, parseFloatArg, refuseNonEmpty } from './model_args.js';
import { Llama } from '../model/llama.js';
import { saveLlamaCheckpoint } from '../model/llama_checkpoint.js';
import { hasCheckpointTokenizer, loadCheckpointTokenizer, writeGpt2Tokenizer } from '../model/hf_tokenizer.js';
import { emit, setJsonOutput, textTable, withJson } from './output.js';
import { addMixingOptions, mixingOptionsOf, readRecipe } from './run_spec_args.js';
import { runStart, ROOT } from './start.js';
import { addServiceCommands } from './service_cmds.js';
import { benchFinetune, benchFinetuneInterleaved, benchFinetuneMixing, benchFinetuneOne, benchFinetunePaired, formatFinetuneBench } from '../bench/finetune.js';
import { addSplitCommands, loadSplit } from './split_cmds.js';
import { addFinetuneCommands, loadRunModel } from './finetune_cmds.js';
import { addAttackCommands } from './attack_cmds.js';
import { addRecordViewOptions, recorderOptionsOf } from './record_view_args.js';
import { recordEnclave, type Recording } from '../attacks/record.js';
import { loadAcceleratorBundle } from '../obfuscate/bundle.js';
import {
  AcceleratorError, BundleError, InputError, IntegrityError, PolicyError, StateError, TransportError, WorkerError,
} from '../errors.js';
import { AttestationError } from '../tee/platform.js';
import { SealError } from '../tee/seal.js';
import { HpkeError } from '../tee/hpke.js';
import { ReplayError } from '../tee/replay.js';
import { SignatureError } from '../tee/signing.js';

function readText(file: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch (e) {
    throw new InputError(`cannot read text file ${file}: ${(e as Error).message}`);
  }
}

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('obfuscatune')
    .description('Confidential fine-tuning and inference of GPT-2-family models, split between a TEE and an untrusted accelerator.')
    .version(packageVersion(), '-V, --version', 'print the version')
    .showHelpAfterError('(add --help for the usage)')
    .showSuggestionAfterError(true)
    .exitOverride()
    .configureHelp({ sortSubcommands: false })
    // --json: stdout carries the result's JSON only (src/cli/output.ts)
    .hook('preAction', (_p, action) => setJsonOutput(action.opts().json === true));

  program
    .command('info')
    .description('show the compute backend (native GEMM or TypeScript), its instruction set and threads')
    .option('--json', 'print JSON')
    .action(() => {
      const info = { backend: backendName(), available: availableBackends(), native: nativeInfo(), presets: presetNames() };
      emit(info, [`backend: ${info.backend} (available: ${info.available.join(', ')})`, ...(info.native ? [`native: ${info.native.isa}, ${info.native.threads} threads`] : []), `presets: ${info.presets.join(', ')}`]);
    });

  withJson(program
    .command('init')
    .description('write a randomly initialised GPT-2 of a preset size as a Hugging Face checkpoint directory')
    .requiredOption('--preset <name>', `one of ${[...presetNames(), ...Object.keys(LLAMA_PRESETS)].join(', ')}`)
    .requiredOption('--out <dir>', 'output directory')
    .option('--force', 'write into a non-empty --out')
    .option('--seed <n>', 'random seed', parseIntArg('--seed'), 1)
    .addOption(new Option('--dtype <dtype>', 'storage dtype').choices(['F32', 'F16', 'BF16']).default('F32')))
    .action((o: { preset: string; out: string; seed: number; dtype: 'F32' | 'F16' | 'BF16'; force?: boolean }) => {
      refuseNonEmpty(o.out, o.force, 'init');
      const llama = LLAMA_PRESETS[o.preset];
      const model = llama ? Llama.random({ ...llama }, o.seed) : GPT2.random(getPreset(o.preset), o.seed);
      if (model instanceof Llama) saveLlamaCheckpoint(o.out, model.weights(), { dtype: o.dtype });
      else saveCheckpoint(o.out, model.weights(), { dtype: o.dtype });
      emit({ out: o.out, preset: o.preset, params: model.numParams(), dtype: o.dtype }, `wrote ${o.preset} (${model.numParams().toLocaleString()} parameters, ${o.dtype}) to ${o.out}`);
    });

  withJson(program
    .command('train')
    .description('plain (local) causal-LM training of a model on a text file, with a progress bar')
    .requiredOption('--model <dir|preset>', 'checkpoint directory, or a preset with --random-init')
    .option('--random-init', 'start from a random initialisation of the preset')
    .requiredOption('--text <file>', 'UTF-8 training text')
    .option('--eval-text <file>', 'UTF-8 text for evaluation before and after')
    .option('--steps <n>', 'optimisation steps', parseIntArg('--steps'), 100)
    .option('--batch <n>', 'sequences per step', parseIntArg('--batch'), 8)
    .option('--seq <n>', 'tokens per sequence', parseIntArg('--seq'), 64)
    .option('--lr <x>', 'peak learning rate', parseFloatArg('--lr'), 1e-3)
    .option('--warmup <n>', 'warm-up steps', parseIntArg('--warmup'), 10)
    .addOption(new Option('--optimizer <name>', 'optimiser').choices(['adamw', 'sgd']).default('adamw'))
    .option('--clip <x>', 'global gradient-norm clip (0 = off)', parseFloatArg('--clip'), 1.0)
    .option('--seed <n>', 'random seed', parseIntArg('--seed'), 1)
    .option('--out <dir>', 'write the trained checkpoint here')
    .option('--force', 'write into a non-empty --out'))
    .action(async (o) => {
      if (o.out) refuseNonEmpty(o.out, o.force, 'train');
      const plain = loadPlainModel(o.model, { randomInit: o.randomInit, seed: o.seed });
      const model = plain.model;
      const tok = plain.tokenizer();
      const stream = Int32Array.from(tok.encode(readText(o.text)));
      const evalStream = o.evalText ? Int32Array.from(tok.encode(readText(o.evalText))) : null;
      const before = evalStream ? await evaluateLM(model, evalStream, o.seq, o.batch, 16) : null;
      if (before) console.error(`eval before: loss ${before.loss.toFixed(4)}, perplexity ${before.perplexity.toFixed(1)}`);
      const bar = progressBar(o.steps, 'train', 'loss {loss} | {tps} tok/s');
      let last = NaN, tokens = 0, ms = 0;
      await trainLM(model, stream, {
        ...o,
        onStep: (s) => {
          tokens += s.tokens;
          ms += s.ms;
          last = s.loss;
          bar.update(s.step + 1, { loss: s.loss.toFixed(4), tps: Math.round((tokens / ms) * 1000) });
        },
      });
      bar.stop();
      const after = evalStream ? await evaluateLM(model, evalStream, o.seq, o.batch, 16) : null;
      if (o.out) plain.save(o.out);
      emit({ steps: o.steps, train_loss_last: last, tokens_per_second: (tokens / ms) * 1000, eval_before: before, eval_after: after, out: o.out ?? null }, [
        `${o.steps} steps, last training loss ${last.toFixed(4)}, ${Math.round((tokens / ms) * 1000)} tokens/s`,
        ...(after ? [`eval after: loss ${after.loss.toFixed(4)}, perplexity ${after.perplexity.toFixed(1)}`] : []),
        ...(o.out ? [`saved to ${o.out}`] : []),
      ]);
    });

  withJson(program
    .command('pretrain')
    .description('pretrain a base model from scratch on the training splits of JSONL datasets (with a progress bar)')
    .requiredOption('--preset <name>', `architecture: ${[...presetNames(), ...Object.keys(LLAMA_PRESETS)].join(', ')}`)
    .requiredOption('--corpus <files...>', 'training JSONL files (validation/test splits are refused)')
    .option('--valid <files...>', 'validation JSONL files (loss reported, never trained on)')
    .option('--steps <n>', 'optimisation steps', parseIntArg('--steps'), 1000)
    .option('--batch <n>', 'sequences per step', parseIntArg('--batch'), 16)
    .option('--seq <n>', 'tokens per sequence', parseIntArg('--seq'), 128)
    .option('--lr <x>', 'peak learning rate', parseFloatArg('--lr'), 3e-3)
    .option('--warmup <n>', 'warm-up steps', parseIntArg('--warmup'), 100)
    .option('--weight-decay <x>', 'AdamW weight decay on matrices', parseFloatArg('--weight-decay'), 0.1)
    .option('--eval-every <n>', 'validate every n steps', parseIntArg('--eval-every'), 200)
    .option('--seed <n>', 'seed', parseIntArg('--seed'), 1)
    .addOption(new Option('--dtype <dtype>', 'checkpoint dtype').choices(['F32', 'F16', 'BF16']).default('F16'))
    .requiredOption('--out <dir>', 'output checkpoint directory')
    .option('--force', 'write into a non-empty --out'))
    .action(async (o) => {
      refuseNonEmpty(o.out, o.force, 'pretrain');
      const { corpusFromJsonl, unigramLoss } = await import('../train/pretrain.js');
      const llama = LLAMA_PRESETS[o.preset];
      const config = llama ? { ...llama } : getPreset(o.preset);
      const tok = tokenizerFor(config.vocab_size);
      const corpus = corpusFromJsonl(o.corpus, tok);
      const valid = o.valid ? corpusFromJsonl(o.valid.map(String), tok, true).stream : null;
      const model = llama ? Llama.random({ ...llama }, o.seed) : GPT2.random(config, o.seed);
      console.error(`pretraining ${o.preset} (${(model.numParams() / 1e6).toFixed(2)}M parameters) on ${corpus.stream.length.toLocaleString()} tokens from ${corpus.documents} documents`);
      const log: Record<string, unknown>[] = [];
      const bar = progressBar(o.steps, 'pretrain', 'loss {loss} | val {val} | {tps} tok/s');
      let tokens = 0, ms = 0, lastVal = '-';
      const t0 = performance.now();
      await trainLM(model, corpus.stream, {
        steps: o.steps, batch: o.batch, seq: o.seq, lr: o.lr, warmup: o.warmup, optimizer: 'adamw', weightDecay: o.weightDecay, clip: 1.0, seed: o.seed,
        onStep: async (s) => {
          tokens += s.tokens;
          ms += s.ms;
          if (valid && ((s.step + 1) % o.evalEvery === 0 || s.step + 1 === o.steps)) {
            const e = await evaluateLM(model, valid, o.seq, o.batch);
            lastVal = e.loss.toFixed(3);
            log.push({ step: s.step + 1, train_loss: s.loss, valid_loss: e.loss, valid_perplexity: e.perplexity });
          }
          bar.update(s.step + 1, { loss: s.loss.toFixed(3), val: lastVal, tps: Math.round((tokens / ms) * 1000) });
        },
      });
      bar.stop();
      const seconds = (performance.now() - t0) / 1000;
      if (model instanceof Llama) {
        // a Hugging Face LlamaForCausalLM directory, with the GPT-2 tokenizer it was trained with
        saveLlamaCheckpoint(o.out, model.weights(), { dtype: o.dtype });
        writeGpt2Tokenizer(o.out);
      } else saveCheckpoint(o.out, model.weights(), { dtype: o.dtype });
      const final = valid ? await evaluateLM(model, valid, o.seq, o.batch) : null;
      const info = {
        preset: o.preset, config, params: model.numParams(), corpus: o.corpus, corpus_tokens: corpus.stream.length, valid: o.valid ?? null,
        steps: o.steps, batch: o.batch, seq: o.seq, lr: o.lr, warmup: o.warmup, weight_decay: o.weightDecay, seed: o.seed, seconds,
        valid_loss: final?.loss ?? null, valid_perplexity: final?.perplexity ?? null,
        unigram_valid_loss: valid ? unigramLoss(corpus.stream, valid, config.vocab_size) : null,
        command: 'obfuscatune ' + process.argv.slice(2).join(' '), log,
      };
      writeFileSync(path.join(o.out, 'pretraining.json'), JSON.stringify(info, null, 2) + '\n');
      emit({ out: o.out, ...info }, `saved ${o.out}: validation loss ${final?.loss.toFixed(4) ?? '-'} (perplexity ${final?.perplexity.toFixed(1) ?? '-'}), unigram baseline ${info.unigram_valid_loss?.toFixed(4) ?? '-'}, ${seconds.toFixed(0)} s`);
    });

  addRecordViewOptions(addMixingOptions(program
    .command('generate')
    .description('generate text from a prompt (KV cache; greedy, temperature, top-k), from a plain model or through the split')
    .option('--model <dir|preset>', 'plain checkpoint directory, or a preset with --random-init')
    .option('--random-init', 'use a random initialisation of the preset')
    .option('--run <dir>', 'a fine-tuning run directory (its merged model)')
    .option('--enclave <dir>', 'enclave bundle (with --accelerator: generate through the split)')
    .option('--accelerator <dir>', 'accelerator bundle')
    .option('--prompt <text>', 'prompt text')
    .option('--file <in.jsonl>', 'records to complete (their prompt: text, prompt, Alpaca or chat; with --run its field names), one result line each in --out')
    .option('--out <preds.jsonl>', 'with --file: one JSON line per record {index, completion}')
    .option('--max-tokens <n>', 'tokens to generate', parseIntArg('--max-tokens'), 40)
    .option('--temperature <x>', '0 = greedy', parseFloatArg('--temperature'), 0)
    .option('--top-k <n>', 'sample among the k most likely tokens (0 = all)', parseIntArg('--top-k'), 0)
    .option('--seed <n>', 'sampling seed', parseIntArg('--seed'), 1)
    .option('--json', 'print JSON {prompt, completion, tokens}')))
    .action(async (o) => {
      const mixing = mixingOptionsOf(o, o.enclave ? 'on' : 'off');
      if (mixing && !o.enclave) throw new InputError('--token-mixing on mixes what crosses to the accelerator: it needs --enclave and --accelerator');
      const opts = { maxNewTokens: o.maxTokens, temperature: o.temperature, topK: o.topK, seed: o.seed };
      const recOpts = recorderOptionsOf(o);
      if (recOpts && !o.enclave) throw new InputError('--record-view records what crosses to the accelerator: it needs --enclave and --accelerator');
      if (!o.prompt === !o.file) throw new InputError('generate needs --prompt TEXT or --file FILE (not both)');
      if (o.file && !o.out) throw new InputError('generate --file needs --out FILE');
      if (o.file && recOpts) throw new InputError('--record-view records one generation: give --prompt, not --file');
      let gen: (prompt: number[]) => Promise<number[]>;
      let nCtx: number;
      let tok;
      let recording: Recording | null = null;
      if (o.enclave || o.accelerator) {
        if (!o.enclave || !o.accelerator) throw new InputError('split generation needs both --enclave and --accelerator');
        if (o.model) throw new InputError('give either --model or --enclave/--accelerator, not both');
        const enclave = loadSplit(o.enclave, o.accelerator, mixing);
        // a Llama-family bundle carries its model's tokenizer (obfuscate copies it in)
        tok = hasCheckpointTokenizer(o.enclave) ? loadCheckpointTokenizer(o.enclave) : tokenizerFor(enclave.config.vocab_size);
        if (recOpts && 'family' in enclave.bundle.tensors) throw new InputError('--record-view serves GPT-2 models for now');
        if (recOpts) {
          const acc = loadAcceleratorBundle(o.accelerator);
          recording = recordEnclave(enclave, acc.weights, { ...recOpts, modelId: acc.manifestSha256.slice(0, 16), modelPath: null, padTokenId: null });
        }
        gen = (p) => enclave.generate(p, { ...opts, stopToken: tok!.eotId });
        nCtx = enclave.config.n_ctx;
      } else {
        if (!o.model && !o.run) throw new InputError('give --model DIR, --run DIR, or --enclave DIR --accelerator DIR');
        if (o.model && o.run) throw new InputError('give either --model or --run, not both');
        const plain = o.run ? null : loadPlainModel(o.model, { randomInit: o.randomInit, seed: o.seed });
        const model = plain ? plain.model : new GPT2(loadRunModel(o.run));
        tok = plain ? plain.tokenizer() : tokenizerFor(model.config.vocab_size);
        gen = (p) => generate(model, p, { ...opts, stopToken: tok!.eotId });
        nCtx = model.config.n_ctx;
      }
      if (o.file) {
        const spec = o.run ? readRunSpec(o.run) : null;
        const recs = readJsonl(o.file, spec ?? DEFAULT_FIELDS, { inference: true });
        const bar = progressBar(recs.length, 'generate');
        const lines: string[] = [];
        for (const [index, r] of recs.entries()) {
          // the prompt's last tokens, leaving room for the completion in the context
          const p = tok.encode(inferenceInput(r, 'lm')).slice(-Math.max(1, nCtx - o.maxTokens));
          lines.push(JSON.stringify({ index, completion: tok.decode(await gen(p.length ? p : [tok.eotId])) }) + '\n');
          bar.update(index + 1);
        }
        bar.stop();
        writeFileSync(o.out, lines.join(''));
        emit({ records: recs.length, out: o.out }, `${recs.length} completions written to ${o.out}`);
        return;
      }
      const ids = await gen(tok.encode(o.prompt));
      if (recording) {
        const { header, truthFile } = recording.save(o.recordView);
        console.error(`recorded the accelerator's view: ${o.recordView} (${header.events} tensors); scoring key ${truthFile}`);
      }
      const completion = tok.decode(ids);
      emit({ prompt: o.prompt, completion, tokens: ids }, o.prompt + completion);
    });

  addSplitCommands(program);
  addServiceCommands(program);
  addFinetuneCommands(program);
  addAttackCommands(program);

  const bench = program.command('bench').description('benchmarks (human-readable by default, --json for tools)');
  bench
    .command('gemm')
    .description('GEMM GFLOPS of the native and TypeScript backends beside numpy (OpenBLAS), on GPT-2 124M shapes')
    .option('--json', 'print JSON')
    .option('--quick', 'fewer shapes and repetitions')
    .option('--tokens <list>', 'token counts m, comma-separated', '256,1024')
    .option('--threads <n>', 'native threads', parseIntArg('--threads'))
    .option('--no-js', 'skip the TypeScript backend')
    .option('--no-reference', 'skip numpy')
    .action(async (o) => {
      const tokens = String(o.tokens).split(',').map((s: string) => parseIntArg('--tokens')(s.trim()));
      const bar = progressBar(1, 'bench gemm', '{label}');
      const r = await benchGemm({ ...o, tokens, onProgress: bar.track });
      bar.stop();
      emitBench(r, formatGemmBench(r));
    });
  stepBenchOptions(bench
    .command('train-step')
    .description('median time and peak memory of one training step (forward, backward, AdamW) on random data'), 'timed steps (after one warm-up step)')
    .option('--model <preset>', 'model preset', 'gpt2')
    .addOption(new Option('--optimizer <name>', 'optimiser').choices(['adamw', 'sgd']).default('adamw'))
    .action(async (o) => {
      const bar = progressBar(o.steps + 1, 'bench train-step');
      const r = await benchTrainStep({ model: o.model, batch: o.batch, seq: o.seq, steps: o.steps, optimizer: o.optimizer, onProgress: (i) => bar.update(i) });
      bar.stop();
      emitBench(r, formatTrainStep(r));
    });

  addMixingOptions(stepBenchOptions(bench
    .command('finetune')
    .description('fine-tuning step time of local, sealed and paper (kappa 1) modes side by side, each in its own process (--interleaved: in one process, steps in rounds; --token-mixing on: sealed without and with token mixing, steps paired in one process)'), 'timed steps per mode (after one warm-up step)')
    .option('--model <preset>', 'model preset (GPT-2 or Llama family; default gpt2, or llama-124m with --family llama)')
    .addOption(new Option('--family <f>', 'model family of the default preset').choices(['gpt2', 'llama']).default('gpt2'))
    .addOption(new Option('--method <method>', 'fine-tuning method').choices(['lora', 'full']).default('lora'))
    .option('--rank <r>', 'LoRA rank', parseIntArg('--rank'), 8)
    .addOption(new Option('--transport <t>', 'enclave-accelerator transport of the split modes (grpc: a spawned accelerator service; the in-process split is measured beside it)').choices(['in-process', 'grpc']).default('in-process'))
    .option('--no-tensor-channel', 'grpc: keep Call frames on gRPC instead of the tensor channel')
    .option('--interleaved', 'in-process: the three modes in one process, steps in rounds, each split mode against local in the same round (robust on a busy machine; one peak RSS for all)'))
    .action(async (o) => {
      o.model ??= o.family === 'llama' ? 'llama-124m' : 'gpt2';
      const mixing = mixingOptionsOf(o, 'off');
      if (mixing && (o.interleaved || o.transport !== 'in-process')) throw new InputError('--token-mixing on pairs sealed steps without and with mixing in one process: use it without --interleaved and --transport grpc');
      if (o.interleaved && o.transport !== 'in-process') throw new InputError('--interleaved measures the in-process modes; use it without --transport grpc');
      const bar = progressBar(mixing || o.interleaved ? o.steps : o.transport === 'in-process' ? 3 : 5, 'bench finetune', '{label}');
      const onProgress = (i: number, _n: number, label: string) => bar.update(i, { label });
      const r = mixing ? await benchFinetuneMixing({ ...o, mixing, transport: 'in-process', onProgress })
        : o.interleaved ? await benchFinetuneInterleaved({ ...o, transport: 'in-process', onProgress }) : benchFinetune({ ...o, onProgress });
      bar.stop();
      emitBench(r, formatFinetuneBench(r));
    });
  stepBenchOptions(bench
    .command('transport')
    .description('tensor transport alone: one LoRA step of frames against an echo accelerator process (tensor channel and gRPC), and against a real accelerator in-process and in a child process'), 'timed steps per path (after one warm-up step)')
    .option('--model <preset>', 'model preset', 'gpt2')
    .action(async (o) => {
      const { benchTransport } = await import('../bench/transport.js');
      const bar = progressBar(4, 'bench transport', '{label}');
      const r = await benchTransport({ ...o, onProgress: (i, _n, label) => bar.update(i, { label }) });
      bar.stop();
      emitBench(r, [
        `${r.model}, batch ${r.batch} x seq ${r.seq}: ${r.rows[0].mb_per_step.toFixed(0)} MB of frames per step, median of ${r.steps} steps`,
        ...r.rows.map((x) => `${x.path.padEnd(50)} ${x.step_ms_median.toFixed(0).padStart(6)} ms/step (min ${x.step_ms_min.toFixed(0)})`),
      ]);
    });
  bench
    .command('echo-accelerator', { hidden: true })
    .description('an accelerator service that answers zeros (used by bench transport)')
    .option('--preset <preset>', 'model preset (shapes)', 'gpt2')
    .option('--no-tensor-channel', 'gRPC only')
    .action(async (o) => {
      const { serveEchoAccelerator } = await import('../bench/transport.js');
      await serveEchoAccelerator(o.preset, o.tensorChannel);
    });
  stepBenchOptions(bench
    .command('finetune-one', { hidden: true })
    .description('one mode of `bench finetune` (used internally)'), 'timed steps')
    .requiredOption('--model <preset>', 'model preset')
    .requiredOption('--method <method>', 'lora|full')
    .requiredOption('--mode <mode>', 'local|sealed|paper')
    .option('--rank <r>', 'LoRA rank', parseIntArg('--rank'), 8)
    .option('--transport <t>', 'in-process|grpc', 'in-process')
    .option('--no-tensor-channel', 'grpc: Call frames over gRPC')
    .action(async (o) => {
      // a gRPC link to an accelerator served in a child process (set up by the benchmark)
      const spawn = o.transport === 'grpc' ? (await import('../roles/spawn.js')).spawnedAcceleratorLink : undefined;
      const link = spawn && ((acc: Parameters<typeof spawn>[0]) => spawn(acc, { tensorChannel: o.tensorChannel }));
      // a split mode over the network is measured together with its in-process twin
      const r = link && o.mode !== 'local' ? await benchFinetunePaired({ ...o, link }) : await benchFinetuneOne({ ...o, link });
      emit(r);
    });

  const exp = program.command('experiment').description('reproducible experiments');
  exp
    .command('paper')
    .option('--config <file>', 'a recipe (YAML or JSON run-spec settings) over every run\'s: it wins over the runner\'s defaults and --quick, --steps wins over it; method, mode and masks are the experiment\'s')
    .description('the paper\'s experiments: local vs sealed vs paper (kappa 1, naive) fine-tuning on the bundled datasets and models, fidelity, share and overhead tables; writes report/results.json and report/index.html')
    .option('--quick', 'a minutes-long version (small subsets, few steps)')
    .option('--models <dirs...>', 'base model checkpoints', ['models/base-small', 'models/base-large'])
    .option('--datasets <names...>', 'datasets under --data', ['food-reviews', 'wordnet-supersense', 'fortunes', 'austen'])
    .option('--data <dir>', 'data directory', 'data')
    .option('--steps <n>', 'fine-tuning steps per run', parseIntArg('--steps'))
    .addOption(new Option('--methods <list...>', 'methods').choices(['lora', 'full']))
    .option('--out <dir>', 'report directory (existing results are kept: the run resumes)', 'report')
    .option('--rows-only', 'only the fine-tuning rows (to split a run across processes on one --out; a later run without it adds the tables and the report)')
    .option('--report-only', 'no runs: rebuild index.html and results.md from --out\'s results.json')
    .option('--json', 'print results.json')
    .action(async (o) => {
      const { runPaperExperiments, mainTable, DATASET_RECIPES, rebuildReport } = await import('../experiments/paper.js');
      if (o.reportOnly) {
        const from = await rebuildReport(o.out);
        return emit({ out: o.out, from }, `wrote ${o.out}/index.html and ${o.out}/results.md from ${from}`);
      }
      // a recipe goes over each dataset's own (so rows made with another are run again); the flags over it
      const recipe = o.config ? readRecipe(o.config, ['method', 'mode', 'kappa', 'two_sided', 'mask_seed']) : undefined;
      if (recipe && o.steps !== undefined) recipe.steps = o.steps;
      const recipes = recipe && Object.fromEntries((o.datasets as string[]).map((d) => [d, {
        lora: mergeRunSpecInputs(DATASET_RECIPES[d]?.lora, recipe), full: mergeRunSpecInputs(DATASET_RECIPES[d]?.full, { ...recipe, lora: undefined }),
      }]));
      const bar = progressBar(1, 'experiments', '{label}');
      const res = await runPaperExperiments({
        models: o.models, datasets: o.datasets, dataDir: o.data, out: o.out, quick: o.quick, steps: o.steps, methods: o.methods, rowsOnly: o.rowsOnly, recipes,
        onProgress: bar.track,
        log: (s) => console.error(s),
      });
      bar.stop();
      const t = mainTable(res);
      emit(res, [...textTable(t.head, t.rows),
        o.rowsOnly ? `\nwrote the rows to ${o.out}/results.json (run without --rows-only for the tables and the report)` : `\nwrote ${o.out}/results.json, ${o.out}/index.html and ${o.out}/results.md`]);
    });

  exp
    .command('security')
    .description('the attack suite: records the accelerator\'s view of LoRA fine-tuning per mode and runs every attack on it; writes report/security.json and report/security.html (docs/security.md)')
    .option('--quick', 'a short version (few steps and batches)')
    .option('--public <dir>', 'the public checkpoint', 'models/base-small')
    .option('--provider-corpus <file>', 'what the provider fine-tunes the public model on', 'data/austen/train.jsonl')
    .option('--provider-steps <n>', 'steps of the provider\'s fine-tuning', parseIntArg('--provider-steps'))
    .option('--provider-lr <x>', 'learning rate of the provider\'s fine-tuning (AdamW)', parseFloatArg('--provider-lr'), 3e-4)
    .option('--provider-model <dir>', 'the provider\'s model made before with the same settings (skips its fine-tuning)')
    .option('--owner-data <file>', 'the data owner\'s private records', 'data/food-reviews/test.jsonl')
    .option('--public-corpus <file>', 'the attacker\'s public corpus of the owner\'s domain', 'data/food-reviews/train.jsonl')
    .option('--modes <list>', 'mode:kappa pairs; mode:kappa:public-base keeps the provider\'s delta in the enclave (Defence 2)', 'sealed:1,paper:1,paper:10,sealed:1:public-base,paper:1:public-base')
    .option('--delta-energy <e>', 'under public-base: the delta energy kept (default 0.9)', parseFloatArg('--delta-energy'))
    .option('--steps <n>', 'owner fine-tuning steps (= observed batches)', parseIntArg('--steps'))
    .option('--batch <n>', 'owner batch size', parseIntArg('--batch'), 8)
    .option('--max-len <n>', 'tokens per owner record', parseIntArg('--max-len'), 64)
    .option('--decode-batches <n>', 'batches decode-public-base decodes', parseIntArg('--decode-batches'))
    .option('--attacks <list>', 'which attacks (comma-separated)')
    .option('--defences <list>', 'none and/or token-mixing (comma-separated)', 'none,token-mixing')
    .option('--unmix-batches <n>', 'batches the unmix attack reads', parseIntArg('--unmix-batches'), 8)
    .option('--unmix-positions <n>', 'candidate positions of the unmix dictionary (default min(n_ctx, 64))', parseIntArg('--unmix-positions'))
    .option('--out <dir>', 'report directory', 'report')
    .option('--json', 'print security.json')
    .action(async (o) => {
      const { runSecurityExperiment, securityTable } = await import('../experiments/security.js');
      const modes = String(o.modes).split(',').map((x: string) => {
        const [mode, kappa = '1', defence] = x.trim().split(':');
        if ((mode !== 'sealed' && mode !== 'paper') || (defence !== undefined && defence !== 'public-base')) throw new InputError(`--modes: "${x}" is not MODE:KAPPA or MODE:KAPPA:public-base (MODE sealed or paper)`);
        return { mode: mode as 'sealed' | 'paper', kappa, publicBase: defence === 'public-base' };
      });
      const bar = progressBar(1, 'experiment security', '{label}');
      const res = await runSecurityExperiment({
        publicModel: o.public, providerCorpus: o.providerCorpus, providerSteps: o.providerSteps ?? (o.quick ? 20 : 60), providerLr: o.providerLr, providerModel: o.providerModel,
        ownerData: o.ownerData, publicCorpus: o.publicCorpus, modes, deltaChoice: o.deltaEnergy !== undefined ? { energy: o.deltaEnergy } : undefined,
        steps: o.steps ?? (o.quick ? 12 : 100), batch: o.batch, maxLen: o.maxLen, decodeBatches: o.decodeBatches ?? (o.quick ? 4 : 20),
        attacks: o.attacks ? String(o.attacks).split(',').map((s: string) => s.trim()) as never : undefined,
        defences: String(o.defences).split(',').map((s: string) => s.trim()) as never, unmixBatches: o.unmixBatches, unmixPositions: o.unmixPositions,
        out: o.out, log: (s) => console.error(s), onProgress: bar.track,
      });
      bar.stop();
      const t = securityTable(res);
      emit(res, [...textTable(t.head.slice(0, -1), t.rows.map((r) => r.slice(0, -1))), `\nwrote ${o.out}/security.json and ${o.out}/security.html`]);
    });

  exp
    .command('public-base')
    .description('the accuracy cost of keeping the provider\'s delta over a public base in the enclave: per rank or energy, the truncated delta\'s relative error and the factored model\'s loss and top-1 accuracy on held-out text (docs/security.md)')
    .option('--public <dir>', 'the public checkpoint', 'models/base-small')
    .option('--model <dir>', 'the provider\'s model derived from it (default: the public one fine-tuned on --provider-corpus, as experiment security does)')
    .option('--provider-corpus <file>', 'what the provider fine-tunes the public model on', 'data/austen/train.jsonl')
    .option('--provider-steps <n>', 'steps of the provider\'s fine-tuning', parseIntArg('--provider-steps'), 60)
    .option('--eval <file>', 'held-out text (JSONL)', 'data/austen/validation.jsonl')
    .option('--ranks <list>', 'ranks to keep (comma-separated)', '1,4,16,64')
    .option('--energies <list>', 'energy shares to keep (comma-separated)', '0.5,0.9,0.99,1')
    .addOption(new Option('--mode <mode>', 'the mode whose factorisation is measured').choices(['sealed', 'paper']).default('sealed'))
    .option('--seq <n>', 'tokens per window', parseIntArg('--seq'), 64)
    .option('--batch <n>', 'windows per batch', parseIntArg('--batch'), 4)
    .option('--max-batches <n>', 'batches evaluated', parseIntArg('--max-batches'), 8)
    .option('--out <dir>', 'where the derived model goes (without --model)', 'report')
    .option('--json', 'print JSON')
    .action(async (o) => {
      const { runPublicBaseCost, publicBaseCostTable } = await import('../experiments/public_base.js');
      const { makeProviderModel } = await import('../experiments/security.js');
      const list = (s: string, flag: string) => numberList(s, flag, 'a number', Number.isFinite, true);
      const choices = [...list(o.ranks, '--ranks').map((rank) => ({ rank })), ...list(o.energies, '--energies').map((energy) => ({ energy }))];
      // progress: the provider's fine-tuning (without --model), then a unit per model scored
      const bar = progressBar(1, 'experiment public-base', '{label}');
      const steps = o.model ? 0 : o.providerSteps;
      const model = o.model ?? await makeProviderModel(o.public, o.providerCorpus, o.providerSteps, 3e-4, path.join(o.out, 'public-base', 'provider-model'), 1, (s) =>
        bar.track(s + 1, steps + 2 + choices.length, `provider model, step ${s + 1}/${steps}`));
      const r = await runPublicBaseCost({
        publicModel: o.public, providerModel: model, evalFile: o.eval, choices, mode: o.mode, seq: o.seq, batch: o.batch, maxBatches: o.maxBatches, log: (s) => console.error(s),
        onProgress: (d, n, label) => bar.track(steps + d, steps + n, label),
      });
      bar.update(steps + 2 + choices.length, { label: 'done' });
      bar.stop();
      const t = publicBaseCostTable(r);
      emit(r, [
        `provider model: loss ${r.provider.loss.toFixed(4)}, top-1 ${(100 * r.provider.accuracy).toFixed(2)}% on ${r.tokens} tokens; the delta is ${(100 * r.public_base.delta_relative_size).toFixed(1)}% of the block weights' norm`,
        ...textTable(t.head, t.rows),
      ]);
    });

  withJson(program
    .command('start')
    .description('the main job (what `npm start` runs): provider, data owner, enclave and accelerator as separate processes, confidential fine-tuning vs local, HTML report')
    .option('--steps <n>', 'fine-tuning steps', parseIntArg('--steps'))
    .option('--model <dir>', 'base model (default: the bundled models/base-small, or models/llama-small with --family llama)')
    .addOption(new Option('--family <f>', 'model family of the bundled base model').choices(['gpt2', 'llama']).default('gpt2'))
    .option('--dataset <name>', 'bundled classification dataset under data/', 'wordnet-supersense')
    .option('--out <dir>', 'run directory (replaced; a non-empty one that is not an earlier start run only with --force)', 'runs/start')
    .option('--force', 'replace a non-empty --out that holds something else'))
    .action(async (o) => {
      if (!existsSync(path.join(o.out, 'local-run'))) refuseNonEmpty(o.out, o.force, 'start'); // an earlier start run is replaced
      await runStart({ steps: o.steps, out: o.out, model: o.model ?? (o.family === 'llama' ? path.join(ROOT, 'models', 'llama-small') : undefined), dataset: o.dataset });
      emit(JSON.parse(readFileSync(path.join(o.out, 'summary.json'), 'utf8')), `summary: ${path.join(o.out, 'summary.json')}`);
    });

  return program;
}

/** A benchmark's result with the machine it ran on (a `machine` field, and the first line of the text). */
function emitBench(r: object, human: string | string[]): void {
  const machine = machineLabel();
  emit({ machine, ...r }, [`machine: ${machine}`, ...(Array.isArray(human) ? human : [human])]);
}

/** --json, --batch, --seq and --steps of the step benchmarks */
function stepBenchOptions(c: Command, stepsHelp: string): Command {
  return c
    .option('--json', 'print JSON')
    .option('--batch <n>', 'batch size', parseIntArg('--batch'), 4)
    .option('--seq <n>', 'sequence length', parseIntArg('--seq'), 64)
    .option('--steps <n>', stepsHelp, parseIntArg('--steps'), 5);
}

/**
 * The exit status of a command that failed with `e` (docs/architecture.md, "Errors"):
 * 2 bad input, 3 a bundle or checkpoint, 4 refused (policy or state), 5 a security check
 * (integrity, attestation, sealing, HPKE, replay), 6 the other side (transport, accelerator,
 * worker thread), 1 anything else.
 */
export function exitCodeOf(e: unknown): number {
  if (e instanceof InputError) return 2;
  if (e instanceof BundleError) return 3;
  if (e instanceof PolicyError || e instanceof StateError) return 4;
  if (e instanceof IntegrityError || e instanceof AttestationError || e instanceof SealError || e instanceof HpkeError || e instanceof ReplayError || e instanceof SignatureError) return 5;
  if (e instanceof TransportError || e instanceof AcceleratorError || e instanceof WorkerError) return 6;
  return 1;
}

/** The version in package.json. */
function packageVersion(): string {
  return (JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
}

export async function main(argv: string[]): Promise<void> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
  } catch (e) {
    // commander has printed its message (unknown option or command, a bad value): a usage error
    if (e instanceof CommanderError) process.exit(e.exitCode === 0 ? 0 : 2);
    throw e;
  }
}

