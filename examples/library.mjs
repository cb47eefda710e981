// The library API on one machine: the provider transform, split inference checked against
// the plain model, generation through the split, and LoRA fine-tuning through the split from
// a run spec, then the provider's merge. Prints one JSON object.
//
//   node examples/library.mjs [MODEL_DIR] [TRAIN_JSONL]
//
// Defaults: the bundled models/base-small and data/wordnet-supersense (a text/label file).
import os from 'node:os';
import path from 'node:path';
import { mkdtempSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import {
  loadCheckpoint, tokenizerFor, GPT2, obfuscateWeights, inProcessSplit, readJsonl, labelSet, encodeRecords,
  parseRunSpec, buildSession, toSessionOptions, toFinetuneConfig, runFinetune, evaluate, mergedPlainModel,
} from 'obfuscatune';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const modelDir = process.argv[2] ?? path.join(root, 'models', 'base-small');
const trainFile = process.argv[3] ?? path.join(root, 'data', 'wordnet-supersense', 'train.jsonl');

const weights = loadCheckpoint(modelDir);
const tok = tokenizerFor(weights.config.vocab_size);

// 1. The provider's transform: obfuscated linears for the accelerator, the small rest for
//    the enclave, and the mask key (here derived from a seed: reproducible, NOT secret).
const obf = obfuscateWeights(weights, { mode: 'sealed', seed: 7 });

// 2. Split inference in one process: the enclave sends only obfuscated tensors over the link.
const { enclave, link } = inProcessSplit(obf);
const ids = tok.encode('It is a truth universally acknowledged');
const T = ids.length;
const split = await enclave.forward(Int32Array.from(ids), 1, T);
const plain = (await new GPT2(weights).forward(Int32Array.from(ids), 1, T)).logits;
let maxDiff = 0;
for (let i = 0; i < split.length; i++) maxDiff = Math.max(maxDiff, Math.abs(split[i] - plain[i]));
const generated = await enclave.generate(ids, { maxNewTokens: 4 });

// 3. Fine-tuning through the split: one run spec (the defaults fill the rest), a session
//    (obfuscation + accelerator + enclave), the loop; then the plain model the provider merges.
const records = readJsonl(trainFile).slice(0, 32);
const labels = labelSet(records, trainFile);
const spec = parseRunSpec({ task: 'cls', method: 'lora', mode: 'sealed', steps: 2, batch: 8, max_len: 16, checkpoint_every: 0 }, 'examples/library.mjs');
const data = encodeRecords(records, tok, { task: 'cls', maxLen: spec.max_len, labels, source: trainFile });
const session = buildSession(weights, toSessionOptions(spec, { numLabels: labels.length, labels, padTokenId: tok.eotId }));
const runDir = mkdtempSync(path.join(os.tmpdir(), 'obfuscatune-example-'));
try {
  const summary = await runFinetune(session.model, data, data, toFinetuneConfig(spec, session.modelId), runDir, tok.eotId, { rng: session.rng });
  const merged = mergedPlainModel(session);
  const check = buildSession(merged, { mode: 'local', method: 'full', task: 'cls', numLabels: labels.length, labels, padTokenId: tok.eotId, seed: 0 });
  const mergedEval = await evaluate(check.model, data, 8, tok.eotId);
  console.log(JSON.stringify({
    split_vs_plain_max_abs_logit_diff: maxDiff,
    generated: generated.length,
    boundary_messages: link.stats.messages,
    finetune: { steps: summary.steps, losses: summary.losses, eval_loss: summary.eval.loss, eval_accuracy: summary.eval.accuracy },
    merged_eval_loss: mergedEval.loss,
  }));
} finally {
  rmSync(runDir, { recursive: true, force: true });
}
