/**
 * Recording the accelerator's view of a fine-tuning session or of an enclave doing inference
 * (`--record-view FILE`): a ViewRecorder on the link, the accelerator's bundle as handed over
 * (copied before any training changes it), and the scoring key from the enclave side.
 */
import path from 'node:path';
import type { Session } from '../train/session.js';
import type { Enclave } from '../enclave/enclave.js';
import type { EnclaveBundle } from '../obfuscate/bundle.js';
import type { AcceleratorWeights } from '../protocol/linears.js';
import type { AcceleratorLink, Observer } from '../protocol/link.js';
import { ViewRecorder, tapBatches, type RecorderOptions, type ViewHeader } from '../protocol/view.js';
import type { MixingConfig } from '../enclave/mixing.js';
import { InputError } from '../errors.js';

export function snapshotWeights(acc: AcceleratorWeights): AcceleratorWeights {
  return { n_layer: acc.n_layer, layers: acc.layers.map((l) => Object.fromEntries(Object.entries(l).map(([k, v]) => [k, { ...v, w: Float32Array.from(v.w), b: Float32Array.from(v.b) }])) as AcceleratorWeights['layers'][number]) };
}

function observersOf(link: AcceleratorLink): Observer[] {
  const obs = (link as { observers?: Observer[] }).observers;
  if (!Array.isArray(obs)) throw new InputError('--record-view: this link has no observers (the view cannot be recorded on it)');
  return obs;
}

/** a [L, w] integer tensor (a permutation per layer) as rows */
function perLayer(x: Int32Array | undefined, L: number): number[][] | null {
  if (!x) return null;
  const w = x.length / L;
  return Array.from({ length: L }, (_, l) => Array.from(x.subarray(l * w, (l + 1) * w)));
}

function mixingHeader(m: MixingConfig | null): Pick<ViewHeader, 'token_mixing' | 'mixing'> {
  return m ? { token_mixing: 'on', mixing: { scheme: m.scheme, kappa: m.kappa, block: m.block, rounds: m.rounds, shields: m.shields } } : { token_mixing: 'off', mixing: null };
}

export interface Recording {
  recorder: ViewRecorder;
  /** writes the view and its truth file; returns the header */
  save(file: string): { header: ViewHeader; truthFile: string };
}

/** Records a fine-tuning session's crossings (sealed or paper mode). */
export function recordSession(s: Session, o: RecorderOptions & { padTokenId: number; modelPath: string | null; spec: string; twoSided: boolean; labels?: string[] }): Recording {
  if (s.model.mode === 'local' || !s.obfuscation) throw new InputError('--record-view needs a split mode (sealed or paper): in local mode nothing crosses to an accelerator');
  const rec = new ViewRecorder(o);
  observersOf(s.link).push(rec.observer);
  tapBatches(s.model as unknown as Parameters<typeof tapBatches>[0], rec, { labels: s.model.task === 'cls' });
  const acc = snapshotWeights(s.obfuscation.accelerator);
  const obf = s.obfuscation;
  const L = obf.enclave.config.n_layer;
  return {
    recorder: rec,
    save: (file) => rec.save(path.resolve(file), {
      kind: 'finetune', mode: s.model.mode, spec: o.spec, two_sided: o.twoSided, ...mixingHeader(s.model.mixingConfig), public_base: obf.enclave.publicBase?.sha256 ?? null, config: obf.enclave.config, model_id: s.modelId,
    }, acc, {
      pad_token_id: o.padTokenId, model: o.modelPath ? path.resolve(o.modelPath) : null,
      pi: perLayer(obf.enclave.tensors.pi, L), head_perm: perLayer(obf.enclave.tensors.headPerm, L),
      labels: s.model.task === 'cls' ? (o.labels ?? null) : null,
    }),
  };
}

/** Records an enclave's inference crossings. `modelId` names the model (a fingerprint, or the accelerator manifest's hash). */
export function recordEnclave(enc: Enclave, acc: AcceleratorWeights, o: RecorderOptions & { modelId: string; modelPath: string | null; padTokenId: number | null }): Recording {
  return recordBundleRun(enc, enc.link, enc.bundle, acc, 'inference', o);
}

/**
 * Records what crosses `link` while `model` (an Enclave, or a SplitModel built from `bundle`:
 * the enclave service's job) runs; `acc` is the accelerator's bundle as handed over.
 */
export function recordBundleRun(model: object, link: AcceleratorLink, b: EnclaveBundle, acc: AcceleratorWeights, kind: ViewHeader['kind'],
  o: RecorderOptions & { modelId: string; modelPath: string | null; padTokenId: number | null; labels?: string[] }): Recording {
  const rec = new ViewRecorder(o);
  observersOf(link).push(rec.observer);
  tapBatches(model as Parameters<typeof tapBatches>[0], rec, { labels: o.labels !== undefined });
  const snap = snapshotWeights(acc);
  const L = b.config.n_layer;
  // the token mixing of an Enclave (its decorator) or of a SplitModel (the enclave service's job)
  const m = model as { mixing?: { o: Parameters<typeof mixingHeader>[0] } | null; mixingConfig?: Parameters<typeof mixingHeader>[0] };
  const mix = m.mixingConfig ?? m.mixing?.o ?? null;
  return {
    recorder: rec,
    save: (file) => rec.save(path.resolve(file), {
      kind, mode: b.mode, spec: b.spec, two_sided: b.twoSided, ...mixingHeader(mix), public_base: b.publicBase?.sha256 ?? null, config: b.config, model_id: o.modelId,
    }, snap, {
      pad_token_id: o.padTokenId, model: o.modelPath ? path.resolve(o.modelPath) : null,
      pi: perLayer(b.tensors.pi, L), head_perm: perLayer(b.tensors.headPerm, L), ...(o.labels ? { labels: o.labels } : {}),
    }),
  };
}
