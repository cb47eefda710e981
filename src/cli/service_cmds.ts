/** CLI: the services (accelerator, enclave) and the parties' clients (provider, owner). */
import { Command, Option } from 'commander';
import { serveAccelerator } from '../roles/accelerator_service.js';
import { EVIL_MODES } from '../accelerator/accelerator.js';
import { parseIntArg, refuseNonEmpty, addPublicBaseOptions, publicBaseOf, isLlamaDir, copyTokenizer } from './model_args.js';
import { loadLlamaCheckpoint, saveLlamaCheckpoint } from '../model/llama_checkpoint.js';
import { addRecordViewOptions, recorderOptionsOf } from './record_view_args.js';
import { addRunSpecOptions, recipeAndFlags, runSpecInputOf } from './run_spec_args.js';
import { BUNDLE_FIELDS, jobSpecOf, parseRunSpec } from '../train/run_spec.js';
import { emit, withJson } from './output.js';
import { progressBar } from './progress.js';
import { existsSync, writeFileSync } from 'node:fs';
import nodePath from 'node:path';
import { createSimRoot, loadSimRoot, SimSoftwarePlatform, SIM_ROOT_FILES } from '../tee/sim.js';
import { serveEnclave } from '../roles/enclave_server.js';
import {
  EnclaveClient, enclaveMeasurement, loadOrCreatePartyKey, partyId, uploadAcceleratorBundle, uploadEnclaveBundle, fetchAndMerge, uploadRecords, inferRecords, waitForJob,
} from '../roles/parties.js';
import { InputError, PolicyError } from '../errors.js';
import { writePeftAdapter } from '../model/peft.js';
import { contractSha256, describeSignatures, draftContract, readContract, signContract, verifyContract, writeContract } from '../roles/contract.js';
import { loadCheckpoint, saveCheckpoint } from '../model/checkpoint.js';
import { parseMaskSpec } from '../linalg/masks.js';
import { BUNDLE_DIRS } from '../obfuscate/provider.js';
import { obfuscateDir } from './split_cmds.js';
import { readJsonObjects } from '../io/jsonl.js';

/** Stops a service cleanly on SIGINT/SIGTERM. */
export function onShutdown(close: () => Promise<void>): void {
  let closing = false;
  const stop = (sig: string) => {
    if (closing) return;
    closing = true;
    console.error(`received ${sig}, shutting down`);
    close().then(() => process.exit(0), () => process.exit(1));
  };
  for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => stop(sig));
}

function trustOptions(cmd: Command): Command {
  return withJson(cmd)
    .requiredOption('--enclave <addr>', 'enclave address host:port')
    .requiredOption('--trust <pem>', 'the platform root public key to trust (simulated platform: sim-root.pub.pem)')
    .requiredOption('--contract <file>', 'the deployment contract, signed by both parties')
    .option('--measurement <hex...>', 'accepted enclave measurements (default: this build\'s, see `enclave measure`)');
}

async function connect(o: { enclave: string; trust: string; measurement?: string[]; contract: string }, keyFile: string): Promise<EnclaveClient> {
  const key = await loadOrCreatePartyKey(keyFile);
  // refused here before anything is sent: a contract both parties have not signed
  const { contract, sha256 } = verifyContract(readContract(o.contract), `contract ${o.contract}`);
  const id = partyId(key);
  if (id !== contract.body.provider && id !== contract.body.owner) {
    throw new PolicyError(`the key in ${keyFile} (${id}) is neither the provider's nor the owner's key in contract ${o.contract}`);
  }
  const c = new EnclaveClient(o.enclave, key, { rootPublicKey: o.trust, allowList: o.measurement ?? [enclaveMeasurement()], contract });
  const a = await c.attest();
  console.error(`attested enclave ${a.evidence.platform} measurement ${a.evidence.measurement.slice(0, 16)}...${a.evidence.simulated ? ' (SIMULATED platform)' : ''}, bound to contract ${sha256.slice(0, 16)}...`);
  return c;
}

/** A command without arguments to the enclave; prints its answer. */
async function oneCommand(o: Parameters<typeof connect>[0], keyFile: string, name: string): Promise<void> {
  const c = await connect(o, keyFile);
  emit(await c.command(name));
  c.close();
}

/** The accelerator and enclave services and the parties' clients. */
export function addServiceCommands(program: Command): void {
  const acc = program.command('accelerator').description('the untrusted accelerator service');
  acc
    .command('serve')
    .description('serve an accelerator bundle over gRPC (prints {"event":"listening","port":P} when ready)')
    .option('--bundle <dir>', 'accelerator bundle directory (default: the uploaded one in the state dir)')
    .requiredOption('--state-dir <dir>', 'the accelerator\'s own storage (uploaded bundle, checkpoints)')
    .option('--host <host>', 'listen address', '127.0.0.1')
    .option('--port <n>', 'port (0 = ephemeral)', parseIntArg('--port'), 50551)
    .addOption(new Option('--evil <mode>', 'simulate a lying accelerator (tests and demos)').choices(EVIL_MODES))
    .option('--max-message-mb <n>', 'largest accepted message', parseIntArg('--max-message-mb'), 256)
    .option('--contract <file>', 'the deployment contract signed by both parties: serve only the attested enclave bound to it, admin calls only from its provider')
    .option('--trust <pem>', 'the platform root public key the enclave\'s evidence must chain to (with --contract)')
    .option('--measurement <hex...>', 'accepted enclave measurements (default: this build\'s)')
    .option('--insecure-no-auth', 'serve anyone, without a contract (benchmarks and transport tests only)')
    .action(async (o) => {
      const contract = o.contract ? verifyContract(readContract(o.contract), `contract ${o.contract}`).contract : undefined;
      const { server, host } = await serveAccelerator({
        ...o, contract, noAuth: o.insecureNoAuth === true,
        trust: contract ? { rootPublicKey: o.trust, allowList: o.measurement ?? [enclaveMeasurement()] } : undefined,
      });
      if (!contract) console.error('accelerator: --insecure-no-auth: serving ANY client (no contract, no authentication)');
      else console.error(`accelerator: serving only the attested enclave bound to contract ${contractSha256(contract.body).slice(0, 16)}...`);
      console.log(JSON.stringify({ event: 'listening', role: 'accelerator', port: server.port, evil: o.evil ?? null }));
      console.error(`accelerator on ${server.address}: ${host.loaded ? `serving bundle ${host.loaded.manifestSha256.slice(0, 12)}` : 'waiting for the provider\'s bundle'}${o.evil ? ` (EVIL: ${o.evil})` : ''}`);
      onShutdown(() => server.close());
    });
  const enc = program.commands.find((c) => c.name() === 'enclave') ?? program.command('enclave').description('the TEE program (simulated platform)');
  withJson(enc
    .command('init-platform')
    .description('create the simulated platform root (signing key standing in for the hardware root, platform secret)')
    .requiredOption('--dir <dir>', 'where to write sim-root.key.pem, sim-root.pub.pem, sim-platform.secret')
    .option('--force', 'overwrite an existing root'))
    .action((o) => {
      createSimRoot(o.dir, { overwrite: o.force });
      const trust = nodePath.join(o.dir, SIM_ROOT_FILES.publicKey);
      emit({ dir: o.dir, trust }, `simulated platform root written to ${o.dir}; clients trust ${trust}`);
    });
  withJson(enc
    .command('measure')
    .description('the measurement of this build of the enclave program (what clients put on their allow-list)'))
    .action(() => emit({ measurement: enclaveMeasurement() }, enclaveMeasurement()));
  addRecordViewOptions(enc
    .command('serve')
    .description('run the enclave service (prints {"event":"listening","port":P} when ready)')
    .requiredOption('--platform <dir>', 'simulated platform root directory (from `enclave init-platform`)')
    .requiredOption('--state-dir <dir>', 'persistent storage: only sealed blobs are written there')
    .requiredOption('--accelerator <addr>', 'accelerator address host:port')
    .option('--host <host>', 'listen address', '127.0.0.1')
    .option('--port <n>', 'port (0 = ephemeral)', parseIntArg('--port'), 50552)
    .option('--record-view-accelerator <dir>', 'with --record-view (tests and measurements): the accelerator bundle handed over, saved with the view of the next job'))
    .action(async (o) => {
      const root = loadSimRoot(o.platform);
      const platform = new SimSoftwarePlatform(root, enclaveMeasurement());
      const rec = recorderOptionsOf(o);
      if (rec && !o.recordViewAccelerator) throw new InputError('enclave serve --record-view needs --record-view-accelerator DIR (the accelerator bundle the view is scored against)');
      const recordView = rec ? { file: o.recordView, accelerator: o.recordViewAccelerator, options: rec } : undefined;
      const s = await serveEnclave({ platform, stateDir: o.stateDir, accelerator: o.accelerator, host: o.host, port: o.port, recordView });
      console.log(JSON.stringify({ event: 'listening', role: 'enclave', port: s.port, measurement: platform.measurement() }));
      console.error(`enclave on ${o.host}:${s.port} (SIMULATED TEE platform), accelerator ${o.accelerator}`);
      onShutdown(() => s.close());
    });

  withJson(program
    .command('party-key')
    .description('a party\'s key file (created when missing, never replaced): prints the signing public key the contract names')
    .requiredOption('--key <file>', 'key file'))
    .action(async (o) => {
      const created = !existsSync(o.key);
      const id = partyId(await loadOrCreatePartyKey(o.key));
      emit({ key: o.key, party: id, created }, id);
    });

  const con = program.command('contract').description('the deployment contract both parties sign before any data moves');
  withJson(con
    .command('draft')
    .description('write an unsigned contract for the provider\'s bundles')
    .requiredOption('--provider <key>', 'the provider\'s signing public key (`party-key`)')
    .requiredOption('--owner <key>', 'the data owner\'s signing public key')
    .requiredOption('--bundles <dir>', 'the directory `provider obfuscate` wrote')
    .requiredOption('--out <file>', 'contract file to write')
    .option('--name <text>', 'what the deployment is', 'obfuscatune deployment')
    .option('--methods <list>', 'allowed methods', 'lora,full')
    .option('--tasks <list>', 'allowed tasks', 'cls,lm')
    .option('--max-steps <n>', 'most steps of one job', parseIntArg('--max-steps'), 10000)
    .option('--max-jobs <n>', 'most jobs in all', parseIntArg('--max-jobs'), 10)
    .option('--cancel <list>', 'who may cancel a job', 'owner')
    .option('--release-provider <list>', 'what the provider receives: update, aggregate_metrics', 'update,aggregate_metrics')
    .option('--release-owner <list>', 'what the owner receives: metrics, inference', 'metrics,inference')
    .option('--force', 'replace an existing --out'))
    .action((o) => {
      if (existsSync(o.out) && !o.force) throw new InputError(`contract draft: --out ${o.out} exists (a contract there may be signed already); give a new file, or --force to replace it`);
      const list = (s: string) => s.split(',').map((x) => x.trim()).filter(Boolean);
      const c = draftContract({
        name: o.name, provider: o.provider, owner: o.owner, acceleratorDir: nodePath.join(o.bundles, 'accelerator'), enclaveDir: nodePath.join(o.bundles, 'enclave'),
        methods: list(o.methods) as ('lora' | 'full')[], tasks: list(o.tasks) as ('cls' | 'lm')[], maxSteps: o.maxSteps, maxJobs: o.maxJobs, cancel: list(o.cancel) as ('owner' | 'provider')[],
        releaseProvider: list(o.releaseProvider) as ('update' | 'aggregate_metrics')[], releaseOwner: list(o.releaseOwner) as ('metrics' | 'inference')[],
      });
      writeContract(o.out, c);
      emit({ out: o.out, sha256: contractSha256(c.body) }, `contract ${contractSha256(c.body)} written to ${o.out} (unsigned)`);
    });
  withJson(con
    .command('sign')
    .description('add this party\'s signature to the contract (in place)')
    .requiredOption('--contract <file>', 'contract file')
    .requiredOption('--key <file>', 'this party\'s key file')
    .addOption(new Option('--as <role>', 'the role this key has in the contract').choices(['provider', 'owner']).makeOptionMandatory()))
    .action(async (o) => {
      const c = signContract(readContract(o.contract), o.as, (await loadOrCreatePartyKey(o.key)).signing);
      writeContract(o.contract, c);
      emit({ contract: o.contract, sha256: contractSha256(c.body), signatures: describeSignatures(c) }, describeSignatures(c));
    });
  withJson(con
    .command('show')
    .description('the contract, its hash and who signed it')
    .requiredOption('--contract <file>', 'contract file'))
    .action((o) => {
      const c = readContract(o.contract);
      const body = { sha256: contractSha256(c.body), ...c.body };
      emit({ ...body, signatures: describeSignatures(c) }, [JSON.stringify(body, null, 2), ...describeSignatures(c)]);
    });

  const prov = program.command('provider').description('the model provider\'s client');
  withJson(addPublicBaseOptions(prov
    .command('obfuscate')
    .description('obfuscate the model into the two bundles and the secret key (nothing is sent)')
    .requiredOption('--model <dir>', 'plain Hugging Face checkpoint directory (GPT-2, or Llama, Mistral, Qwen2)')
    .requiredOption('--out <dir>', 'where the provider keeps the bundles and its secret key')
    .addOption(new Option('--mode <mode>', 'obfuscation mode').choices(['sealed', 'paper']).default('sealed'))
    .option('--kappa <k>', 'mask condition number', '1')
    .addOption(new Option('--rotary-masks <m>', 'Llama family: full per-head q/k masks or rotation-and-scale blocks (docs/obfuscation.md)').choices(['full', 'blocks']))
    .option('--force', 'write into a non-empty --out (replacing its secret key: bundles made with the old one can then never be merged back)')))
    .action((o) => {
      const spec = parseMaskSpec(String(o.kappa));
      refuseNonEmpty(o.out, o.force, 'provider obfuscate', BUNDLE_DIRS);
      const { acceleratorSha256 } = obfuscateDir(o.model, o.out, 'provider obfuscate', { mode: o.mode, spec, publicBase: publicBaseOf(o), rotary: o.rotaryMasks });
      emit({ out: o.out, mode: o.mode, kappa: String(o.kappa), accelerator_sha256: acceleratorSha256 }, `bundles written to ${o.out}: accelerator/, enclave/, provider/ (secret)`);
    });
  const provKey = (o: { key?: string; bundles: string }) => o.key ?? nodePath.join(o.bundles, 'provider', 'party-key.json');
  // the provider's commands that reach the enclave: its bundles directory and key file
  const provCmd = (name: string, what: string) => trustOptions(prov.command(name).description(what))
    .requiredOption('--bundles <dir>', 'the directory `provider obfuscate` wrote')
    .option('--key <file>', 'the provider\'s key file (default: BUNDLES/provider/party-key.json)');
  provCmd('deploy', 'verify the enclave, upload the accelerator bundle (signed) to the accelerator and the encrypted enclave bundle to the enclave')
    .requiredOption('--accelerator <addr>', 'accelerator address')
    .action(async (o) => {
      const c = await connect(o, provKey(o));
      // progress: one unit per bundle, what is happening in the label
      const bar = progressBar(2, 'provider deploy', '{label}');
      const a = await uploadAcceleratorBundle(o.accelerator, nodePath.join(o.bundles, 'accelerator'), c.key, (_d, _n, label) => bar.update(0, { label: `accelerator bundle: ${label}` }));
      bar.update(1, { label: `accelerator loaded bundle ${a.manifest_sha256.slice(0, 16)}...` });
      const e = await uploadEnclaveBundle(c, nodePath.join(o.bundles, 'enclave'), (_d, _n, label) => bar.update(1, { label: `enclave bundle: ${label}` }));
      bar.update(2, { label: 'deployed' });
      bar.stop();
      console.error(`accelerator loaded bundle ${a.manifest_sha256.slice(0, 16)}...`);
      emit({ accelerator: a, enclave: e }, `deployed: accelerator bundle ${a.manifest_sha256.slice(0, 16)}..., enclave bundle ${JSON.stringify(e)}`);
      c.close();
    });
  for (const [name, what] of [['status', 'job status (aggregate metrics)'], ['cancel', 'cancel the running job (when the contract lets the provider)']]) {
    provCmd(name, what).action((o) => oneCommand(o, provKey(o), name));
  }
  provCmd('fetch', 'receive the fine-tuned update (encrypted to the provider) and merge it into a plain checkpoint')
    .requiredOption('--base <dir>', 'the original plain checkpoint')
    .requiredOption('--accelerator <addr>', 'accelerator address (trained weights of full fine-tuning)')
    .requiredOption('--out <dir>', 'output checkpoint directory')
    .option('--peft-out <dir>', 'also write the LoRA update as a Hugging Face PEFT adapter directory')
    .option('--force', 'write into a non-empty --out')
    .action(async (o) => {
      refuseNonEmpty(o.out, o.force, 'provider fetch');
      const llama = isLlamaDir(o.base);
      if (llama && o.peftOut) throw new InputError('--peft-out serves GPT-2 models for now');
      const c = await connect(o, provKey(o));
      const base = llama ? loadLlamaCheckpoint(o.base) : loadCheckpoint(o.base);
      const { merged, update, adapters } = await fetchAndMerge(c, o.accelerator, base, o.bundles, nodePath.join(o.bundles, 'scratch'));
      if (o.peftOut && !adapters) throw new InputError(`--peft-out: the update is of method ${String(update.method)}, it has no LoRA adapters`);
      if (o.peftOut && adapters) writePeftAdapter(o.peftOut, adapters, { task: update.task as 'lm' | 'cls', baseModel: nodePath.resolve(o.base), score: merged.cls?.weight });
      if ('arch' in base) {
        saveLlamaCheckpoint(o.out, merged as typeof base, { arch: base.arch });
        copyTokenizer(o.base, o.out);
      } else saveCheckpoint(o.out, merged as typeof base);
      emit({ out: o.out, ...update }, `merged the update (${String(update.method)}, ${String(update.task)}) into ${o.out}`);
      c.close();
    });

  const own = program.command('owner').description('the data owner\'s client');
  const withKey = (cmd: Command) => trustOptions(cmd).requiredOption('--key <file>', 'the owner\'s key file (created on first use)');
  withKey(own.command('upload').description('encrypt each record to the attested enclave and upload')
    .requiredOption('--train <file>', 'training JSONL').option('--eval <file>', 'evaluation JSONL'))
    .action(async (o) => {
      const c = await connect(o, o.key);
      const train = readJsonObjects(o.train), evalRecs = o.eval ? readJsonObjects(o.eval) : null;
      // progress: a unit per record encrypted here, one per record the enclave checks and opens
      const bar = progressBar(2 * (train.length + (evalRecs?.length ?? 0)), 'owner upload', '{label}');
      const up = (split: 'train' | 'eval', recs: object[], off: number) => uploadRecords(c, split, recs, (d, _n, label) => bar.update(off + d, { label: `${split}: ${label}` }));
      const result = { train: await up('train', train, 0), eval: evalRecs ? await up('eval', evalRecs, 2 * train.length) : null };
      bar.stop();
      emit(result,
        `uploaded ${train.length} training${evalRecs ? ` and ${evalRecs.length} evaluation` : ''} records, each encrypted to the enclave`);
      c.close();
    });
  withKey(addRunSpecOptions(own.command('finetune').description('start fine-tuning in the enclave and follow its metrics (the settings: a run spec, the same flags and defaults as `finetune`, validated here and again in the enclave)'),
    { bundleNote: 'the provider\'s bundle fixes it: given, the enclave refuses the job unless the bundle has it' }))
    .action(async (o) => {
      // refused here, before connecting, exactly as the enclave would refuse it; bundle settings given go along for the enclave to check
      const { input, source } = recipeAndFlags(o, runSpecInputOf(o));
      const bundleGiven = Object.fromEntries(Object.entries(input).filter(([k, v]) => (BUNDLE_FIELDS as readonly string[]).includes(k) && v !== undefined && v !== null));
      const ownSettings = Object.fromEntries(Object.entries(input).filter(([k]) => !(BUNDLE_FIELDS as readonly string[]).includes(k)));
      const spec = { ...jobSpecOf(parseRunSpec(ownSettings, source)), ...bundleGiven };
      const c = await connect(o, o.key);
      const started = await c.command<{ warnings?: string[] }>('start_finetune', { spec });
      for (const w of started.warnings ?? []) console.error(`warning: ${w}`);
      const bar = progressBar(spec.steps, 'owner finetune', 'loss {loss}');
      const s = await waitForJob(c, (st) => {
        const j = st.job as { step: number; steps: number; loss: number | null } | null;
        if (j) bar.update(j.step, { loss: j.loss?.toFixed(4) ?? '-' });
      });
      bar.stop();
      const job = s.job as { state: string; step: number; steps: number; error?: string | null };
      emit(job, `job ${job.state} at step ${job.step}/${job.steps}${job.error ? `: ${job.error}` : ''}`);
      c.close();
    });
  withKey(own.command('status').description('job status and metrics')).action((o) => oneCommand(o, o.key, 'status'));
  withKey(own.command('cancel').description('cancel the running job')).action((o) => oneCommand(o, o.key, 'cancel'));
  withKey(own.command('infer').description('inference with the fine-tuned model in the enclave: labels and their probabilities (classification) or completions (LM)')
    .option('--text <texts...>', 'input texts')
    .option('--file <in.jsonl>', 'records to predict (read in the enclave with the job\'s field names; Alpaca and chat records: their prompt)')
    .option('--out <preds.jsonl>', 'with --file: one JSON line per record ({index, prediction, probabilities} or {index, completion})')
    .option('--max-tokens <n>', 'LM: tokens to generate per record (at most 64)', parseIntArg('--max-tokens'), 20))
    .action(async (o) => {
      if (!o.text === !o.file) throw new InputError('owner infer needs --text TEXT... or --file FILE (not both)');
      if (o.file && !o.out) throw new InputError('owner infer --file needs --out FILE (the predictions, one JSON line per record)');
      const records = o.file ? readJsonObjects(o.file) : null;
      const c = await connect(o, o.key);
      if (!records) emit(await c.command('infer', { texts: o.text, max_tokens: o.maxTokens }));
      else {
        const bar = progressBar(records.length, 'owner infer', '');
        const lines = await inferRecords(c, records, { maxTokens: o.maxTokens, onBatch: (n) => bar.update(n, {}) });
        bar.stop();
        writeFileSync(o.out, lines.map((l) => JSON.stringify(l) + '\n').join(''));
        emit({ records: lines.length, out: o.out }, `${lines.length} predictions written to ${o.out}`);
      }
      c.close();
    });
}
