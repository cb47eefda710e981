/**
 * `npm start`: the whole story on one machine. Starts the untrusted accelerator and the
 * (simulated) TEE enclave as child processes on loopback, acts as the model provider
 * (obfuscates the bundled pretrained model, uploads the two bundles) and as the data owner
 * (encrypts a bundled dataset to the attested enclave, fine-tunes, runs inference), runs
 * the same fine-tuning locally as the baseline, and prints and writes a report.
 */
import { existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadCheckpoint } from '../model/checkpoint.js';
import { readJsonl, labelSet, encodeRecords, type Record_ } from '../io/jsonl.js';
import { gpt2Tokenizer } from '../model/tokenizer.js';
import { buildSession } from '../train/session.js';
import { runFinetune, evaluate } from '../train/finetune.js';
import { parseRunSpec, jobSpecOf, toFinetuneConfig, toSessionOptions } from '../train/run_spec.js';
import { obfuscateLlamaWeights, obfuscateWeights, writeObfuscation } from '../obfuscate/provider.js';
import { createSimRoot } from '../tee/sim.js';
import { spawnService, type Spawned } from '../roles/spawn.js';
import { EnclaveClient, enclaveMeasurement, loadOrCreatePartyKey, partyId, uploadAcceleratorBundle, uploadEnclaveBundle, uploadRecords, waitForJob, fetchAndMerge } from '../roles/parties.js';
import { describeSignatures, draftContract, signContract, verifyContract, writeContract } from '../roles/contract.js';
import { GPT2 } from '../model/gpt2.js';
import { Llama, type LlamaWeights } from '../model/llama.js';
import type { GPT2Weights } from '../model/weights.js';
import { loadLlamaCheckpoint } from '../model/llama_checkpoint.js';
import { hasCheckpointTokenizer, loadCheckpointTokenizer } from '../model/hf_tokenizer.js';
import { isLlamaDir } from './model_args.js';
import { textTable } from './output.js';
import { majorityAccuracy } from '../experiments/paper.js';
import { backendName } from '../tensor/gemm.js';
import { progressBar } from './progress.js';
import { lineSpec, renderSvg, curveGapNote } from '../report/charts.js';
import { page, table } from '../report/html.js';
import { BundleError, ObfuscatuneError } from '../errors.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

export interface StartOptions {
  out: string;
  steps?: number;
  model?: string;
  dataset?: string;
  trainExamples?: number;
  testExamples?: number;
}

export async function runStart(o: StartOptions): Promise<void> {
  // the demo's run spec; the local baseline differs in mode only (and keeps no checkpoints)
  const spec = parseRunSpec({ task: 'cls', method: 'lora', steps: o.steps, batch: 16, max_len: 64, lr: 2e-3, warmup: 6, checkpoint_every: 20, adam_eps: 1e-6 }, 'npm start');
  const localSpec = parseRunSpec({ ...spec, mode: 'local', kappa: null, token_mixing: null, checkpoint_every: 0 }, 'npm start (local baseline)');
  const steps = spec.steps;
  const modelDir = o.model ?? path.join(ROOT, 'models', 'base-small');
  const dataDir = path.join(ROOT, 'data', o.dataset ?? 'wordnet-supersense');
  if (!existsSync(path.join(modelDir, 'config.json'))) throw new BundleError(`bundled model ${modelDir} not found`);
  const out = path.resolve(o.out);
  rmSync(out, { recursive: true, force: true });
  mkdirSync(out, { recursive: true });
  // either family: a Llama-family base model keeps its own tokenizer (llama-small's is GPT-2's BPE)
  const llama = isLlamaDir(modelDir);
  const base = llama ? loadLlamaCheckpoint(modelDir) : loadCheckpoint(modelDir);
  const train = readJsonl(path.join(dataDir, 'train.jsonl')).slice(0, o.trainExamples ?? 640);
  const test = readJsonl(path.join(dataDir, 'test.jsonl')).slice(0, o.testExamples ?? 256);
  const labels = labelSet(train, 'train');
  const say = (s: string) => console.log(s);
  say(`obfuscatune: confidential fine-tuning of ${path.basename(modelDir)} (${((llama ? new Llama(base as LlamaWeights) : new GPT2(base as GPT2Weights)).numParams() / 1e6).toFixed(1)}M parameters${llama ? ', Llama family' : ''}) on ${path.basename(dataDir)} (${train.length} training / ${test.length} test records), compute backend ${backendName()}`);

  // ---- 1. the baseline: plain local fine-tuning with the same engine
  say('\n[1/4] local baseline (plain model, same engine, no split)');
  const t0 = performance.now();
  const tok = llama && hasCheckpointTokenizer(modelDir) ? loadCheckpointTokenizer(modelDir) : gpt2Tokenizer;
  const trainSet = encodeRecords(train, tok, { task: 'cls', maxLen: spec.max_len, labels, source: 'train' });
  const testSet = encodeRecords(test, tok, { task: 'cls', maxLen: spec.max_len, labels, source: 'test' });
  const local = buildSession(base, toSessionOptions(localSpec, { numLabels: labels.length, labels, padTokenId: tok.eotId }));
  const cfg = toFinetuneConfig(localSpec, local.modelId);
  let bar = progressBar(steps, 'local', 'loss {loss}');
  const localSum = await runFinetune(local.model, trainSet, testSet, cfg, path.join(out, 'local-run'), tok.eotId, { rng: local.rng, onStep: (m) => bar.update(m.step, { loss: m.loss.toFixed(3) }) });
  bar.stop();
  const localSeconds = (performance.now() - t0) / 1000;

  // ---- 2. the parties' keys, the provider's bundles and the contract both sign; then the cloud
  say('\n[2/4] keys, obfuscation (sealed mode), the deployment contract signed by both parties; accelerator and enclave (simulated TEE) on loopback');
  const providerKey = await loadOrCreatePartyKey(path.join(out, 'provider', 'party-key.json'));
  const ownerKey = await loadOrCreatePartyKey(path.join(out, 'owner', 'party-key.json'));
  const obf = llama ? obfuscateLlamaWeights(base as LlamaWeights, { mode: 'sealed' }) : obfuscateWeights(base as GPT2Weights, { mode: 'sealed' });
  writeObfuscation(path.join(out, 'provider'), obf);
  let draft = draftContract({
    name: 'npm start', provider: partyId(providerKey), owner: partyId(ownerKey),
    acceleratorDir: path.join(out, 'provider', 'accelerator'), enclaveDir: path.join(out, 'provider', 'enclave'),
    methods: ['lora'], tasks: ['cls'], maxSteps: Math.max(steps, 1), maxJobs: 1, cancel: ['owner'],
  });
  draft = signContract(draft, 'provider', providerKey.signing);
  draft = signContract(draft, 'owner', ownerKey.signing);
  const { contract, sha256: contractHash } = verifyContract(draft);
  const contractFile = path.join(out, 'contract.json');
  writeContract(contractFile, contract);
  const signedBy = describeSignatures(contract);
  say(`      contract ${contractHash.slice(0, 16)}... (${contractFile}): ${signedBy.map((l) => l.replace(/ [A-Za-z0-9+/]{43}=/, (k) => ` ${k.trim().slice(0, 12)}...`)).join('; ')}`);
  createSimRoot(path.join(out, 'platform'));
  const children: Spawned[] = [];
  const stopAll = async () => {
    for (const c of children.reverse()) await c.kill('SIGTERM');
  };
  const onSig = () => {
    console.error('\ninterrupted: stopping the services');
    stopAll().then(() => process.exit(130), () => process.exit(130));
  };
  process.once('SIGINT', onSig);
  process.once('SIGTERM', onSig);
  try {
    const acc = await spawnService(['accelerator', 'serve', '--state-dir', path.join(out, 'cloud', 'accelerator'), '--port', '0', '--contract', contractFile, '--trust', path.join(out, 'platform', 'sim-root.pub.pem')]);
    children.push(acc);
    const accAddr = `127.0.0.1:${acc.port}`;
    const enc = await spawnService(['enclave', 'serve', '--platform', path.join(out, 'platform'), '--state-dir', path.join(out, 'cloud', 'enclave'), '--accelerator', accAddr, '--port', '0']);
    children.push(enc);
    const encAddr = `127.0.0.1:${enc.port}`;
    const trust = { rootPublicKey: path.join(out, 'platform', 'sim-root.pub.pem'), allowList: [enclaveMeasurement()], contract };
    say(`      accelerator ${accAddr}, enclave ${encAddr}`);

    // ---- 3. the provider and the owner
    say('\n[3/4] provider: attest (submits the contract), upload the bundles; owner: attest, check the bundle, encrypt and upload records, fine-tune');
    const t1 = performance.now();
    const provider = new EnclaveClient(encAddr, providerKey, trust);
    const att = await provider.attest();
    say(`      provider verified the enclave: ${att.evidence.platform} measurement ${att.evidence.measurement.slice(0, 16)}... (simulated platform: ${att.evidence.simulated}), bound to contract ${att.contractSha256!.slice(0, 16)}...`);
    await uploadAcceleratorBundle(accAddr, path.join(out, 'provider', 'accelerator'), providerKey);
    await uploadEnclaveBundle(provider, path.join(out, 'provider', 'enclave'));
    const owner = new EnclaveClient(encAddr, ownerKey, trust);
    await owner.attest();
    await uploadRecords(owner, 'train', train);
    await uploadRecords(owner, 'eval', test);
    await owner.command('start_finetune', { spec: jobSpecOf(spec) });
    bar = progressBar(steps, 'confidential', 'loss {loss}');
    const st = await waitForJob(owner, (s) => {
      const j = s.job as { step: number; loss: number | null } | null;
      if (j) bar.update(j.step, { loss: j.loss?.toFixed(3) ?? '-' });
    }) as Record<string, unknown>;
    bar.stop();
    const job = st.job as { state: string; error: string | null; losses: number[]; summary: { eval: { loss: number; accuracy: number }; seconds: number } };
    if (job.state !== 'done') throw new ObfuscatuneError(`the confidential job ${job.state}: ${job.error}`);
    const confSeconds = (performance.now() - t1) / 1000;
    const examples: Record_[] = test.slice(0, 4);
    const inf = await owner.command<{ predictions: string[] }>('infer', { texts: examples.map((r) => r.text!) });

    // ---- 4. the provider receives the update and merges it with its secret key
    say('\n[4/4] provider: fetch the update (encrypted to the provider) and merge it into a plain checkpoint');
    const { merged } = await fetchAndMerge(provider, accAddr, base, path.join(out, 'provider'), path.join(out, 'provider', 'scratch'));
    const check = buildSession(merged, { mode: 'local', method: 'full', task: 'cls', numLabels: labels.length, labels, padTokenId: tok.eotId, seed: 0 });
    const mergedEval = await evaluate(check.model, testSet, 32, tok.eotId);
    provider.close();
    owner.close();
    const traffic = st.accelerator_traffic as { messages: number; bytes: number };

    // ---- summary
    const le = localSum.eval!, ce = job.summary.eval, be = localSum.eval_before!;
    const rows: (string | number)[][] = [
      ['before training (base model, fresh head)', be.loss.toFixed(4), `${(100 * be.accuracy!).toFixed(1)}%`, '-', '-'],
      ['local (plain, baseline)', le.loss.toFixed(4), `${(100 * le.accuracy!).toFixed(1)}%`, localSeconds.toFixed(1), '-'],
      ['confidential (sealed split, 2 processes)', ce.loss.toFixed(4), `${(100 * ce.accuracy).toFixed(1)}%`, confSeconds.toFixed(1), `${traffic.messages} messages, ${(traffic.bytes / 1e6).toFixed(1)} MB`],
      ['provider\'s merged plain model', mergedEval.loss.toFixed(4), `${(100 * mergedEval.accuracy!).toFixed(1)}%`, '-', '-'],
      ['majority class (reference)', '-', `${(100 * majorityAccuracy(train, test)).toFixed(1)}%`, '-', '-'],
    ];
    const head = ['run', 'test loss', 'test accuracy', 'seconds', 'accelerator traffic'];
    say('');
    for (const line of textTable(head, rows.map((r) => r.map(String)))) say(line);
    const integrity = st.integrity_checks as number;
    say(`\nThe accelerator saw only obfuscated tensors (rotated or per-head-masked activations and gradients; MLP hidden values permuted${spec.token_mixing === 'on' ? '; every call\'s rows freshly token-mixed with shield rows' : ''}) and ran ${traffic.messages} requests; every reply passed ${integrity.toLocaleString()} secret-vector integrity checks.`);
    say(`Neither token ids, labels, logits nor losses crossed to it. The provider never saw the records; the owner never saw the weights.`);
    say(`Who signed what: the contract ${contractHash.slice(0, 16)}... (${signedBy.join('; ')}); the enclave bound it into every attestation report and the accelerator served only that attested enclave; every upload chunk and command was signed by its party's key, the accelerator bundle by the provider's.`);
    say(`Inference in the enclave: ${examples.map((r, i) => `"${r.text!.slice(0, 40)}..." -> ${inf.predictions[i]} (true: ${r.label})`).join('; ')}`);

    const curve = [
      ...localSum.losses.map((y, i) => ({ x: i + 1, y, series: 'local' })),
      ...job.losses.map((y, i) => ({ x: i + 1, y, series: 'confidential (sealed)' })),
    ];
    const gap = curveGapNote(localSum.losses, job.losses, 'local vs confidential');
    say(`Training loss, ${gap}.`);
    const svg = await renderSvg(lineSpec(curve, { title: 'training loss per step', subtitle: gap, x: 'step', y: 'cross-entropy' }));
    const html = page('obfuscatune: confidential fine-tuning run', [
      { title: 'Result', html: table(head, rows) },
      { title: 'Training loss', html: svg },
      { title: 'What each party saw', html: table(['party', 'saw'], [
        ['accelerator (untrusted)', `obfuscated linear weights; ${traffic.messages} requests with obfuscated activations and gradients (${(traffic.bytes / 1e6).toFixed(1)} MB); never token ids, labels, logits or losses`],
        ['enclave (attested, simulated platform)', 'plain data and the small part of the model; every accelerator reply checked'],
        ['model provider', 'attestation evidence, the fine-tuned update (encrypted to it), aggregate metrics'],
        ['data owner', 'attestation evidence, metrics, inference results (encrypted to it)'],
      ]) },
      { title: 'Who signed what', html: table(['what', 'signed by'], [
        [`deployment contract ${contractHash.slice(0, 16)}...`, signedBy.join('; ')],
        ['every upload chunk and command to the enclave', 'the sending party\'s Ed25519 key (the contract names it)'],
        ['accelerator bundle upload and weight export', 'the provider\'s key'],
        ['each enclave connection to the accelerator', 'the enclave: attestation evidence over the connection\'s challenge and the contract'],
      ]) },
      { title: 'Inference examples', html: table(['text', 'prediction', 'label'], examples.map((r, i) => [r.text!.slice(0, 120), inf.predictions[i], r.label!])) },
      { title: 'Setup', html: table(['item', 'value'], [
        ['model', `${path.basename(modelDir)} (${base.config.n_layer} layers, d=${base.config.n_embd})`], ['dataset', path.basename(dataDir)],
        ['method', `LoRA r=${spec.lora!.rank}, targets ${spec.lora!.targets.join(',')}, ${steps} steps, batch ${spec.batch}`], ['mode', 'sealed (orthogonal residual basis)'],
        ['platform', 'sim-software: a SIMULATED TEE (no hardware isolation)'], ['backend', backendName()],
      ]) },
    ], `Generated by npm start on ${new Date().toISOString()}.`);
    writeFileSync(path.join(out, 'report.html'), html);
    writeFileSync(path.join(out, 'summary.json'), JSON.stringify({ local: le, confidential: ce, merged: mergedEval, traffic, integrity_checks: integrity, contract: { sha256: contractHash, signatures: signedBy }, local_seconds: localSeconds, confidential_seconds: confSeconds }, null, 2) + '\n');
    say(`\nreport: ${path.join(out, 'report.html')}`);
  } finally {
    await stopAll();
    process.removeListener('SIGINT', onSig);
    process.removeListener('SIGTERM', onSig);
  }
}
