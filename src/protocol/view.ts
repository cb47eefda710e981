/**
 * The adversary's view on disk: every tensor that crossed the enclave-accelerator boundary
 * (both directions, with op, layer, linear, field and shape), plus the accelerator bundle the
 * accelerator holds. This is exactly what a curious accelerator could keep; the attacks of
 * src/attacks read nothing else about the run.
 *
 * File: a safetensors file. Its metadata holds
 *   format  "obfuscatune-view/1"
 *   header  JSON (ViewHeader): model fingerprint, mode, mask spec, bundle hash, counts
 *   events  JSON array, one entry per recorded tensor: [call, dir, op, layer, name, field, rows, cols]
 * and its tensors are `t.<i>` (event i, F32 [rows, cols]) and `bundle.<l>.<linear>.w|b`.
 *
 * Beside it, `<file>.truth.json` is the scoring key, NOT part of the view: the owner's
 * tokens of each batch (with the call at which the batch started), the pad token, and the
 * provider's secret permutations and model path. Only evaluation reads it.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { openSafetensors, readSafetensorsHeader, writeSafetensors, type TensorToWrite } from '../io/safetensors.js';
import type { GPT2Config } from '../model/config.js';
import { blockLinearDims, blockLinearNames } from '../model/family.js';
import { linearTensors, type AcceleratorWeights } from './linears.js';
import type { CrossingEvent, Observer } from './link.js';
import { InputError, ViewError } from '../errors.js';

export const VIEW_FORMAT = 'obfuscatune-view/1';
export const TRUTH_FORMAT = 'obfuscatune-view-truth/1';

export type ViewMode = 'sealed' | 'paper' | 'local';

export interface ViewEvent {
  /** index of the accelerator call (request and its reply share it) */
  call: number;
  direction: 'to_accelerator' | 'to_enclave';
  op: string;
  layer: number;
  name: string;
  field: string;
  rows: number;
  cols: number;
}

export interface ViewHeader {
  format: string;
  /** what was recorded: a fine-tuning run or inference (generation / batch forward) */
  kind: 'finetune' | 'inference';
  mode: ViewMode;
  /** mask spec label ("1", "10", "naive") */
  spec: string;
  two_sided: boolean;
  /** defence 1 (per-call token mixing, src/enclave/mixing.ts) */
  token_mixing: 'off' | 'on';
  /** its settings when on (src/enclave/mixing.ts; views of the dense scheme alone have no scheme or rounds, and shields true or false) */
  mixing?: { scheme?: string; kappa: number; block: number; rounds?: number; shields: string | boolean } | null;
  /** defence 2: the SHA-256 of the public base the accelerator's weights are (the delta stayed in the enclave); null or absent: the provider's model */
  public_base?: string | null;
  config: GPT2Config;
  /** fingerprint of the provider's plain model (src/train/session.ts modelFingerprint) */
  model_id: string;
  /** SHA-256 of the accelerator's weights (acceleratorWeightsSha256) */
  bundle_sha256: string;
  events: number;
  calls: number;
  recorded_bytes: number;
  /** tensors left out by the recording filter or its size limit */
  dropped_events: number;
  filter: { layers: number[] | null; max_bytes: number; custom: boolean };
}

export interface TruthBatch {
  /** the first accelerator call of this batch */
  call: number;
  tokens: number[];
  /** position of each row within its sequence */
  pos: number[];
  /** classification: the label index of each sequence (names in ViewTruth.labels) */
  labels?: number[];
}

export interface ViewTruth {
  format: string;
  model_id: string;
  bundle_sha256: string;
  pad_token_id: number | null;
  /** the provider's plain checkpoint (for scoring recovered weights), when known */
  model: string | null;
  /** the MLP permutation of each layer (f*[:, j] = f[:, pi[j]]) */
  pi: number[][] | null;
  /** masked head slot j holds head headPerm[j] */
  head_perm: number[][] | null;
  /** classification: the label names, by index */
  labels?: string[] | null;
  batches: TruthBatch[];
}

/** SHA-256 over the accelerator's weights and biases in bundle order (layer, linear, w then b). */
export function acceleratorWeightsSha256(acc: AcceleratorWeights): string {
  const h = createHash('sha256');
  for (const { data: x } of linearTensors(acc, 'bundle')) h.update(Buffer.from(x.buffer, x.byteOffset, x.byteLength));
  return h.digest('hex');
}

export interface RecorderOptions {
  /** record only these layers (default: all) */
  layers?: number[];
  /** stop recording tensors beyond this many bytes (default 2 GiB); the rest are counted as dropped */
  maxBytes?: number;
  /** a finer filter: keep an event (seen during batch `batch`, -1 before the first) */
  keep?: (e: CrossingEvent, batch: number) => boolean;
}

/**
 * Records what crosses a link (attach `recorder.observer` to the link's observers) and, for
 * scoring only, the owner's batches (`beginBatch`, called by the enclave side before each forward).
 */
export class ViewRecorder {
  readonly events: ViewEvent[] = [];
  private readonly data: Float32Array[] = [];
  private calls = 0;
  private bytes = 0;
  private dropped = 0;
  readonly truthBatches: TruthBatch[] = [];
  private readonly layers: Set<number> | null;
  private readonly maxBytes: number;
  private warned = false;

  constructor(private readonly opts: RecorderOptions = {}) {
    this.layers = opts.layers ? new Set(opts.layers) : null;
    this.maxBytes = opts.maxBytes ?? 2 ** 31;
    if (!(this.maxBytes > 0)) throw new InputError(`view recorder: the size limit must be positive, got ${this.maxBytes}`);
  }

  readonly observer: Observer = (e) => {
    if (e.direction === 'to_accelerator') this.calls++;
    const call = this.calls - 1;
    const layer = e.layer ?? -1;
    if (this.layers && !this.layers.has(layer)) { this.dropped++; return; }
    if (this.opts.keep && !this.opts.keep(e, this.truthBatches.length - 1)) { this.dropped++; return; }
    if (this.bytes + e.data.byteLength > this.maxBytes) {
      this.dropped++;
      if (!this.warned) {
        this.warned = true;
        process.emitWarning(`view recorder: size limit of ${this.maxBytes} bytes reached; later tensors are not recorded`);
      }
      return;
    }
    this.events.push({ call, direction: e.direction, op: e.op, layer, name: e.name ?? '', field: e.field, rows: e.rows, cols: e.cols });
    this.data.push(Float32Array.from(e.data)); // the link may reuse its buffers
    this.bytes += e.data.byteLength;
  };

  /** The owner's tokens of the next forward (scoring key), row by row, with each row's position. */
  beginBatch(tokens: ArrayLike<number>, pos: ArrayLike<number>, labels?: ArrayLike<number>): void {
    if (tokens.length !== pos.length) throw new InputError(`view recorder: ${tokens.length} tokens but ${pos.length} positions`);
    this.truthBatches.push({ call: this.calls, tokens: Array.from(tokens), pos: Array.from(pos), ...(labels ? { labels: Array.from(labels) } : {}) });
  }

  /**
   * Writes the view to `file` and its scoring key to `<file>.truth.json`. `acc` is the
   * accelerator's bundle as it was handed over (before any training).
   */
  save(file: string, h: Omit<ViewHeader, 'format' | 'events' | 'calls' | 'recorded_bytes' | 'dropped_events' | 'filter' | 'bundle_sha256'>, acc: AcceleratorWeights, truth: Omit<ViewTruth, 'format' | 'model_id' | 'bundle_sha256' | 'batches'>): { header: ViewHeader; truthFile: string } {
    const header: ViewHeader = {
      format: VIEW_FORMAT, ...h, bundle_sha256: acceleratorWeightsSha256(acc),
      events: this.events.length, calls: this.calls, recorded_bytes: this.bytes, dropped_events: this.dropped,
      filter: { layers: this.layers ? [...this.layers] : null, max_bytes: this.maxBytes, custom: this.opts.keep !== undefined },
    };
    const tensors: TensorToWrite[] = this.events.map((e, i): TensorToWrite => ({ name: `t.${i}`, dtype: 'F32', shape: [e.rows, e.cols], data: this.data[i] }));
    tensors.push(...linearTensors(acc, 'bundle', ['w', 'b']));
    const events = this.events.map((e) => [e.call, e.direction === 'to_accelerator' ? 0 : 1, e.op, e.layer, e.name, e.field, e.rows, e.cols]);
    writeSafetensors(file, tensors, { format: VIEW_FORMAT, header: JSON.stringify(header), events: JSON.stringify(events) });
    const t: ViewTruth = { format: TRUTH_FORMAT, model_id: header.model_id, bundle_sha256: header.bundle_sha256, ...truth, batches: this.truthBatches };
    const truthFile = `${file}.truth.json`;
    writeFileSync(truthFile, JSON.stringify(t) + '\n');
    return { header, truthFile };
  }
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type AnyFn = (...args: any[]) => Promise<any>;

/**
 * Wraps an enclave-side model's `forward(tokens, B, T, ...)` (and `forwardCached(cache, tokens)`
 * when it has one) so that the recorder learns each batch's tokens before it crosses. Only
 * the scoring key uses them; the view itself gets nothing from here.
 */
export function tapBatches(model: { forward?: AnyFn; forwardCached?: AnyFn }, rec: ViewRecorder, o: { labels?: boolean } = {}): void {
  const m = model as unknown as Record<string, AnyFn | undefined>;
  const fwd = m.forward?.bind(model);
  if (fwd) {
    m.forward = async (tokens: Int32Array, B: number, T: number, ...rest: unknown[]) => {
      // a classification forward's next argument is the labels [B]
      const labels = o.labels && rest[0] instanceof Int32Array && rest[0].length === B ? rest[0] : undefined;
      rec.beginBatch(tokens, Int32Array.from({ length: B * T }, (_, i) => i % T), labels); // row positions 0..T-1 per sequence
      return fwd(tokens, B, T, ...rest);
    };
  }
  const cached = m.forwardCached?.bind(model);
  if (cached) {
    m.forwardCached = async (cache: { pos: number }, tokens: ArrayLike<number>) => {
      rec.beginBatch(tokens, Array.from({ length: tokens.length }, (_, i) => cache.pos + i));
      return cached(cache, tokens);
    };
  }
}

export interface LoadedView {
  file: string;
  header: ViewHeader;
  events: ViewEvent[];
  /** the tensor of event i, [rows, cols] */
  tensor(i: number): Float32Array;
  /** the accelerator bundle recorded with the view */
  bundle(): AcceleratorWeights;
}

function parseJson<T>(text: string | undefined, what: string, file: string): T {
  if (text === undefined) throw new ViewError(`view file ${file} has no "${what}" in its metadata (not a view, or a corrupt one)`);
  try {
    return JSON.parse(text) as T;
  } catch (e) {
    throw new ViewError(`view file ${file}: its "${what}" metadata is not valid JSON (corrupt)`, { cause: e });
  }
}

/** Opens a view file; refuses a missing, truncated, corrupt or other-version file with a ViewError. */
export function loadView(file: string): LoadedView {
  if (!existsSync(file)) throw new ViewError(`view file ${file} not found`);
  let h: ReturnType<typeof readSafetensorsHeader>;
  try {
    h = readSafetensorsHeader(file);
  } catch (e) {
    throw new ViewError(`view file ${file} is truncated or not a safetensors file (${(e as Error).message})`, { cause: e });
  }
  const meta = h.metadata ?? {};
  if (meta.format !== VIEW_FORMAT) throw new ViewError(`view file ${file} has format ${JSON.stringify(meta.format ?? null)}, expected "${VIEW_FORMAT}"`);
  const header = parseJson<ViewHeader>(meta.header, 'header', file);
  const raw = parseJson<unknown[]>(meta.events, 'events', file);
  if (header.format !== VIEW_FORMAT) throw new ViewError(`view file ${file}: header format ${JSON.stringify(header.format)}, expected "${VIEW_FORMAT}"`);
  if (!Array.isArray(raw) || raw.length !== header.events) throw new ViewError(`view file ${file}: its header counts ${header.events} events, its event list has ${Array.isArray(raw) ? raw.length : 'none'} (corrupt)`);
  let end = 0;
  for (const t of h.tensors.values()) end = Math.max(end, t.dataOffsets[1]);
  if (h.fileSize < h.dataStart + end) throw new ViewError(`view file ${file} is truncated: ${h.fileSize} bytes on disk, its header describes ${h.dataStart + end}`);
  const events: ViewEvent[] = raw.map((r, i): ViewEvent => {
    const a = r as [number, number, string, number, string, string, number, number];
    if (!Array.isArray(a) || a.length !== 8) throw new ViewError(`view file ${file}: event ${i} is malformed`);
    const t = h.tensors.get(`t.${i}`);
    if (!t || t.shape.length !== 2 || t.shape[0] !== a[6] || t.shape[1] !== a[7]) throw new ViewError(`view file ${file}: event ${i} has no tensor of shape [${a[6]}, ${a[7]}] (corrupt)`);
    return { call: a[0], direction: a[1] === 0 ? 'to_accelerator' : 'to_enclave', op: a[2], layer: a[3], name: a[4], field: a[5], rows: a[6], cols: a[7] };
  });
  const st = openSafetensors(file);
  return {
    file, header, events,
    tensor: (i) => st.get(`t.${i}`),
    bundle: () => {
      const layers: AcceleratorWeights['layers'] = [];
      for (let l = 0; l < header.config.n_layer; l++) {
        const rec: AcceleratorWeights['layers'][number] = {};
        for (const name of blockLinearNames(header.config)) {
          const [din, dout] = blockLinearDims(header.config, name);
          const wn = `bundle.${l}.${name}.w`, bn = `bundle.${l}.${name}.b`;
          if (!st.has(wn) || !st.has(bn)) throw new ViewError(`view file ${file} lacks the accelerator bundle's ${wn} (corrupt)`);
          rec[name] = { w: st.get(wn), b: st.get(bn), din, dout };
        }
        layers.push(rec);
      }
      return { n_layer: header.config.n_layer, layers };
    },
  };
}

export interface ViewExpectation {
  /** the attack was asked for this mode */
  mode?: string;
  /** the model the attacker holds must have the view's shapes */
  config?: GPT2Config;
  what?: string;
}

/** Refuses a view recorded from another mode or a model of other dimensions. */
export function checkView(v: LoadedView, x: ViewExpectation): void {
  const h = v.header;
  if (x.mode !== undefined && x.mode !== h.mode) throw new ViewError(`view file ${v.file} was recorded in ${h.mode} mode; the attack was asked for ${x.mode} mode`);
  if (x.config) {
    for (const k of ['n_layer', 'n_embd', 'n_head', 'vocab_size', 'n_ctx'] as const) {
      if (x.config[k] !== h.config[k]) throw new ViewError(`view file ${v.file} comes from another model: its ${k} is ${h.config[k]}, ${x.what ?? 'the given model'}'s is ${x.config[k]}`);
    }
  }
}

/** The scoring key of a view; refuses one recorded with another model or bundle. */
export function loadTruth(file: string, v: LoadedView): ViewTruth {
  if (!existsSync(file)) throw new ViewError(`truth file ${file} not found (it is written beside the view as <view>.truth.json)`);
  let t: ViewTruth;
  try {
    t = JSON.parse(readFileSync(file, 'utf8')) as ViewTruth;
  } catch (e) {
    throw new ViewError(`truth file ${file} is not valid JSON (truncated or corrupt)`, { cause: e });
  }
  if (t.format !== TRUTH_FORMAT) throw new ViewError(`truth file ${file} has format ${JSON.stringify(t.format)}, expected "${TRUTH_FORMAT}"`);
  if (t.model_id !== v.header.model_id || t.bundle_sha256 !== v.header.bundle_sha256) throw new ViewError(`truth file ${file} belongs to another view (model ${t.model_id}, bundle ${t.bundle_sha256.slice(0, 12)}...; the view has model ${v.header.model_id}, bundle ${v.header.bundle_sha256.slice(0, 12)}...)`);
  return t;
}
