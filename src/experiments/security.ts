/**
 * `experiment security`: what a curious accelerator recovers, measured.
 *
 *   1. The provider's model: the public checkpoint fine-tuned (plain, full, AdamW) on a
 *      corpus of the provider's; the delta is what the provider wants to keep.
 *   2. Per mode: the data owner fine-tunes it (classification, LoRA) through the split on
 *      private records, and the accelerator's view is recorded (layer 0's qkv inputs of every
 *      batch; the MLP hidden of every layer for the first batches; the last layer's output
 *      gradient) with the bundle it holds.
 *   3. Every attack runs on every view, in its setting: secret-model (frequency,
 *      label-recovery), known-plaintext, public-base (weight-alignment, decode-public-base,
 *      mlp-permutation, unmix). Each mode runs without a defence and with token mixing.
 *   4. security.json and security.html: attack x mode x setting x defence -> metric,
 *      baseline, and the command that reproduces the number from the saved view.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { loadCheckpoint, saveCheckpoint } from '../model/checkpoint.js';
import { GPT2 } from '../model/gpt2.js';
import { tokenizerFor } from '../model/tokenizer.js';
import { readJsonl, encodeRecords, labelSet } from '../io/jsonl.js';
import { buildSession } from '../train/session.js';
import { runFinetune } from '../train/finetune.js';
import { parseRunSpec, toFinetuneConfig, toSessionOptions, writeRunSpec } from '../train/run_spec.js';
import { trainLM } from '../train/lm.js';
import { corpusFromJsonl } from '../train/pretrain.js';
import { loadView, loadTruth } from '../protocol/view.js';
import { recordSession } from '../attacks/record.js';
import type { AttackProgress, AttackResult } from '../attacks/common.js';
import { weightAlignmentAttack } from '../attacks/weight_alignment.js';
import { decodePublicBaseAttack } from '../attacks/decode.js';
import { frequencyAttack } from '../attacks/frequency.js';
import { knownPlaintextAttack } from '../attacks/known_plaintext.js';
import { mlpPermutationAttack } from '../attacks/mlp_permutation.js';
import { labelRecoveryAttack } from '../attacks/label_recovery.js';
import { unmixAttack } from '../attacks/unmix.js';
import { MIXING_DEFAULTS, mixingLabel } from '../enclave/mixing.js';
import { lineSpec, renderSvg } from '../report/charts.js';
import { page, table } from '../report/html.js';
import { InputError } from '../errors.js';
import { DEFAULT_DELTA_ENERGY } from '../obfuscate/provider.js';
import type { RankChoice } from '../linalg/svd.js';

export const ATTACKS = ['weight-alignment', 'decode-public-base', 'mlp-permutation', 'frequency', 'known-plaintext', 'label-recovery', 'unmix'] as const;
export const DEFENCES = ['none', 'token-mixing'] as const;
export type AttackName = (typeof ATTACKS)[number];

export interface SecurityOptions {
  /** the public checkpoint (the attacker has it in the public-base setting) */
  publicModel: string;
  /** what the provider fine-tunes the public model on (training split: plain text records) */
  providerCorpus: string;
  providerSteps: number;
  providerLr?: number;
  /** a provider model made before (as makeProviderModel does): skips the provider's fine-tuning */
  providerModel?: string;
  /** the owner's private labelled records (JSONL with "text" and "label"): classification fine-tuning */
  ownerData: string;
  /** the attacker's public corpus of the owner's domain */
  publicCorpus: string;
  /** per mode: with `publicBase`, Defence 2 (the accelerator holds the masked public base, the enclave the delta) */
  modes: { mode: 'sealed' | 'paper'; kappa: string; publicBase?: boolean }[];
  /** the delta kept in the enclave under Defence 2 (default: DEFAULT_DELTA_ENERGY) */
  deltaChoice?: RankChoice;
  /** each mode without a defence and/or with token mixing (default both) */
  defences?: (typeof DEFENCES)[number][];
  /** unmix: attack at most this many batches, candidate positions 0..n-1 */
  unmixBatches?: number;
  unmixPositions?: number;
  steps: number;
  batch: number;
  maxLen: number;
  /** batches whose MLP hidden of every layer is recorded (mlp-permutation) */
  hiddenBatches?: number;
  /** decode at most this many batches in decode-public-base */
  decodeBatches?: number;
  attacks?: AttackName[];
  out: string;
  seed?: number;
  log?: (s: string) => void;
  /** units: the provider's fine-tuning, then per view its recording and each attack; the label says which step or phase */
  onProgress?: AttackProgress;
}

export interface SecurityRow extends AttackResult {
  model: string;
  view: string;
  command: string;
  seconds: number;
}

export interface SecurityResults {
  format: 'obfuscatune-security/1';
  public_model: string;
  provider_model: string;
  provider: { corpus: string; steps: number; lr: number };
  owner: { data: string; steps: number; batch: number; max_len: number; method: 'lora'; task: 'cls' };
  public_corpus: string;
  command: string;
  rows: SecurityRow[];
}

/** The provider's model: the public one fine-tuned on the provider's corpus (plain, full, AdamW). */
export async function makeProviderModel(publicDir: string, corpus: string, steps: number, lr: number, out: string, seed = 1, onStep?: (step: number) => void): Promise<string> {
  const w = loadCheckpoint(publicDir);
  const model = new GPT2(w); // a fresh copy: loadCheckpoint allocates new (shared) buffers
  const tok = tokenizerFor(w.config.vocab_size);
  const { stream } = corpusFromJsonl([corpus], tok);
  await trainLM(model, stream, { steps, batch: 8, seq: Math.min(64, w.config.n_ctx), lr, warmup: Math.max(1, Math.floor(steps / 10)), seed, onStep: onStep && ((s) => onStep(s.step)) });
  saveCheckpoint(out, model.weights());
  return out;
}

function rel(p: string): string {
  const r = path.relative(process.cwd(), p);
  return r.startsWith('..') ? p : r;
}

export async function runSecurityExperiment(o: SecurityOptions): Promise<SecurityResults> {
  const log = o.log ?? (() => {});
  const attacks = o.attacks ?? [...ATTACKS];
  for (const a of attacks) if (!(ATTACKS as readonly string[]).includes(a)) throw new InputError(`unknown attack "${a}" (expected one of ${ATTACKS.join(', ')})`);
  const dir = path.join(o.out, 'security');
  mkdirSync(path.join(dir, 'views'), { recursive: true });
  const lr = o.providerLr ?? 3e-4;
  const seed = o.seed ?? 1;
  const defences = o.defences ?? [...DEFENCES];
  for (const d of defences) if (!(DEFENCES as readonly string[]).includes(d)) throw new InputError(`unknown defence "${d}" (expected one of ${DEFENCES.join(', ')})`);
  const total = (o.providerModel ? 0 : 1) + o.modes.length * defences.length * (1 + attacks.length);
  let done = 0;
  const at = (label: string) => o.onProgress?.(done, total, label);
  log(`provider model: ${o.publicModel} fine-tuned ${o.providerSteps} steps on ${o.providerCorpus}`);
  const provDir = o.providerModel ?? await makeProviderModel(o.publicModel, o.providerCorpus, o.providerSteps, lr, path.join(dir, 'provider-model'), seed, (s) => at(`provider model, step ${s + 1}/${o.providerSteps}`));
  if (!o.providerModel) done++;
  const prov = loadCheckpoint(provDir);
  const pub = loadCheckpoint(o.publicModel);
  const tok = tokenizerFor(prov.config.vocab_size);
  const padId = tok.eotId;
  const rows: SecurityRow[] = [];
  const hiddenBatches = o.hiddenBatches ?? 8;
  for (const m of o.modes) for (const defence of defences) {
    const name = `${m.mode}-k${m.kappa}${m.publicBase ? '-public-base' : ''}${defence === 'token-mixing' ? '-mix' : ''}`;
    const viewFile = path.join(dir, 'views', `${name}.view.safetensors`);
    const runDir = path.join(dir, 'runs', name);
    const spec = parseRunSpec({
      task: 'cls', method: 'lora', mode: m.mode, kappa: m.kappa, steps: o.steps, batch: o.batch, max_len: Math.min(o.maxLen, prov.config.n_ctx),
      warmup: Math.max(1, Math.floor(o.steps / 20)), checkpoint_every: 0, seed, lr: 1e-3, token_mixing: defence === 'token-mixing' ? 'on' : 'off',
    }, `experiment security ${name}`);
    const recs = readJsonl(o.ownerData);
    const labels = labelSet(recs, o.ownerData);
    const train = encodeRecords(recs, tok, { task: 'cls', maxLen: spec.max_len, labels, source: o.ownerData });
    const sess = buildSession(prov, {
      ...toSessionOptions(spec, { padTokenId: padId, numLabels: labels.length, labels, acceleratorStateDir: path.join(runDir, 'accelerator-state') }),
      publicBase: m.publicBase ? { weights: pub, choice: o.deltaChoice ?? { energy: DEFAULT_DELTA_ENERGY } } : undefined,
    });
    const last = prov.config.n_layer - 1;
    // layer 0's qkv inputs of every batch; every layer's MLP hidden (fc outputs) of the first batches
    const rec = recordSession(sess, {
      padTokenId: padId, modelPath: provDir, spec: m.kappa, twoSided: false, labels,
      keep: (e, batch) => (e.layer === 0 && e.name === 'qkv' && e.op === 'linear_forward' && e.direction === 'to_accelerator')
        || (batch < hiddenBatches && e.name === 'fc' && e.op === 'linear_forward' && e.direction === 'to_enclave')
        || (e.layer === last && e.name === 'fcproj' && e.op === 'linear_backward' && e.direction === 'to_accelerator'),
    });
    mkdirSync(runDir, { recursive: true });
    writeRunSpec(runDir, spec);
    const t0 = performance.now();
    log(`${name}: owner LoRA fine-tuning, ${o.steps} steps, recording the view`);
    at(`${name}: recording the view`);
    await runFinetune(sess.model, train, null, toFinetuneConfig(spec, sess.modelId), runDir, padId, { rng: sess.rng, onStep: (s) => at(`${name}: recording the view, step ${s.step}/${o.steps}`) });
    rec.save(viewFile);
    done++;
    log(`${name}: recorded in ${((performance.now() - t0) / 1000).toFixed(0)} s`);
    const view = loadView(viewFile);
    const truth = loadTruth(`${viewFile}.truth.json`, view);
    const v = rel(viewFile);
    const P = `--public ${rel(o.publicModel)}`, C = `--corpus ${rel(o.publicCorpus)}`, corpus = o.publicCorpus;
    const unmixBatches = o.unmixBatches ?? 8;
    // per attack: the flags of the command that reproduces its row from the view, and its run
    const attack: Record<AttackName, [string, (p: AttackProgress) => AttackResult | Promise<AttackResult>]> = {
      'weight-alignment': [P, (p) => weightAlignmentAttack(view, pub, truth, prov, p)],
      'decode-public-base': [`${P} ${C}${o.decodeBatches ? ` --max-batches ${o.decodeBatches}` : ''}`,
        (p) => decodePublicBaseAttack(view, pub, truth, { corpus, maxBatches: o.decodeBatches, onProgress: p })],
      'mlp-permutation': [`${P} ${C}`, (p) => mlpPermutationAttack(view, pub, truth, { corpus, onProgress: p })],
      frequency: [C, (p) => frequencyAttack(view, truth, { corpus, onProgress: p })],
      'known-plaintext': ['--known-fraction 0.1', (p) => knownPlaintextAttack(view, truth, { knownFraction: 0.1, seed, onProgress: p })],
      'label-recovery': [C, () => labelRecoveryAttack(view, truth, { corpus, seed })],
      unmix: [`${P} ${C} --max-batches ${unmixBatches}${o.unmixPositions ? ` --positions ${o.unmixPositions}` : ''}`,
        (p) => unmixAttack(view, pub, truth, { corpus, maxBatches: unmixBatches, positions: o.unmixPositions, onProgress: p })],
    };
    for (const a of attacks) {
      const t1 = performance.now();
      at(`${name} ${a}`);
      const p: AttackProgress = (d, n, label) => at(`${name} ${a}: ${label} (${d}/${n})`);
      const r = await attack[a][1](p);
      const command = `obfuscatune attack ${a} --view ${v} ${attack[a][0]} --json`;
      rows.push({ ...r, model: path.basename(path.resolve(o.publicModel)), view: v, command, seconds: (performance.now() - t1) / 1000 });
      done++;
      log(`${name} ${a}: ${r.metric} ${r.value.toFixed(4)} (baseline ${r.baseline.toFixed(4)})`);
    }
  }
  at('the report');
  const res: SecurityResults = {
    format: 'obfuscatune-security/1', public_model: rel(o.publicModel), provider_model: rel(provDir),
    provider: { corpus: rel(o.providerCorpus), steps: o.providerSteps, lr },
    owner: { data: rel(o.ownerData), steps: o.steps, batch: o.batch, max_len: o.maxLen, method: 'lora', task: 'cls' },
    public_corpus: rel(o.publicCorpus),
    command: 'obfuscatune ' + process.argv.slice(2).join(' '),
    rows,
  };
  writeFileSync(path.join(o.out, 'security.json'), JSON.stringify(res, null, 1) + '\n');
  writeFileSync(path.join(o.out, 'security.html'), await securityReport(res));
  return res;
}

const pct = (x: number) => (Number.isFinite(x) ? `${(100 * x).toFixed(2)}%` : 'n/a');

export function securityTable(res: SecurityResults): { head: string[]; rows: string[][] } {
  return {
    head: ['attack', 'mode', 'kappa', 'setting', 'defence', 'metric', 'value', 'baseline', 'observed batches', 'command'],
    rows: res.rows.map((r) => [r.attack, r.mode, r.kappa, r.setting, r.defence, r.metric, pct(r.value), pct(r.baseline), String(r.observed_batches), r.command]),
  };
}

async function securityReport(res: SecurityResults): Promise<string> {
  const t = securityTable(res);
  const curve: { x: number; y: number; series: string }[] = [];
  for (const r of res.rows) {
    if (r.attack !== 'frequency') continue;
    for (const c of (r.details?.curve as { observed_batches: number; token_recovery: number; baseline: number }[] | undefined) ?? []) {
      curve.push({ x: c.observed_batches, y: 100 * c.token_recovery, series: `${r.mode} k${r.kappa}` });
      curve.push({ x: c.observed_batches, y: 100 * c.baseline, series: `baseline (${r.mode} k${r.kappa})` });
    }
  }
  const setup = `<p>Public model <code>${res.public_model}</code>; the provider's model <code>${res.provider_model}</code> is it fine-tuned ${res.provider.steps} steps (full, AdamW, lr ${res.provider.lr}) on <code>${res.provider.corpus}</code>. The data owner fine-tunes the provider's model for classification with LoRA for ${res.owner.steps} steps (batch ${res.owner.batch}, at most ${res.owner.max_len} tokens per record) on <code>${res.owner.data}</code>; the attacker's public corpus is <code>${res.public_corpus}</code>. Defence "public-base": the accelerator held the masked public base and the enclave the provider's delta (data protection then rests on token mixing alone). Defence "token-mixing" is the same run with per-call token mixing on (its defaults: ${mixingLabel(MIXING_DEFAULTS)}); "both" combines them. Reproduce: <code>${res.command}</code>.</p>`;
  return page('obfuscatune: what a curious accelerator recovers', [
    { title: 'Setup', html: setup },
    { title: 'Attacks (metric against the guess without the view)', html: table(t.head, t.rows) },
    ...(curve.length ? [{ title: 'Frequency analysis: token recovery against observed batches', html: await renderSvg(lineSpec(curve, { title: 'frequency attack', x: 'observed batches', y: 'tokens recovered (%)', width: 700 })) }] : []),
  ], 'Each number comes from the view saved beside this report; the command column reproduces it from that file.');
}
