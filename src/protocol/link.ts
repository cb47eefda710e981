/**
 * Transports between the enclave and the accelerator. The enclave only ever talks to an
 * `AcceleratorLink`; the in-process link calls an `Accelerator` directly (optionally
 * through the binary codec, to prove every message serialises), and an observer sees
 * every tensor that crosses, in both directions: the adversary's view.
 */
import { decodeMessage, encodeMessage, type AcceleratorReply, type AcceleratorRequest } from './messages.js';

export interface CrossingEvent {
  direction: 'to_accelerator' | 'to_enclave';
  /** the request's op (replies carry the op of the request they answer) */
  op: string;
  layer?: number;
  name?: string;
  /** field name for requests (x, dy), "data" for replies */
  field: string;
  rows: number;
  cols: number;
  data: Float32Array;
}

export type Observer = (e: CrossingEvent) => void;

export interface CallOptions {
  /**
   * The caller drops the reply's tensors by its next `releaseScratch()`: a link may then
   * receive them into reused buffers (the split trainer's per-step activations).
   */
  scratch?: boolean;
}

export interface AcceleratorLink {
  call(req: AcceleratorRequest, opts?: CallOptions): Promise<AcceleratorReply>;
  /** every scratch reply handed out so far is dead: its buffer may be reused */
  releaseScratch?(): void;
  close?(): Promise<void>;
}

/** Sends each request's tensors, then the reply's tensors, to the observers. */
export function observe(req: AcceleratorRequest, rep: AcceleratorReply, observers: Observer[]): void {
  if (observers.length === 0) return;
  const ref = 'layer' in req ? { layer: req.layer, name: req.name } : {};
  for (const [field, v] of Object.entries(req)) {
    if (v instanceof Float32Array) {
      const rows = (req as { rows?: number }).rows ?? 1;
      for (const o of observers) o({ direction: 'to_accelerator', op: req.op, ...ref, field, rows, cols: v.length / rows, data: v });
    }
  }
  if (rep.op === 'tensor') {
    for (const o of observers) o({ direction: 'to_enclave', op: req.op, ...ref, field: 'data', rows: rep.rows, cols: rep.cols, data: rep.data });
  }
}

/** Whatever answers requests synchronously in this process (the accelerator, src/accelerator). */
export interface InProcessHandler {
  handle(req: AcceleratorRequest): AcceleratorReply;
}

export class InProcessLink implements AcceleratorLink {
  readonly observers: Observer[] = [];
  /** messages and bytes that crossed (encoded size) */
  stats = { messages: 0, bytes: 0 };

  constructor(private readonly acc: InProcessHandler, private readonly opts: { serialize?: boolean } = {}) {}

  async call(req: AcceleratorRequest): Promise<AcceleratorReply> {
    return this.callSync(req);
  }

  callSync(req: AcceleratorRequest): AcceleratorReply {
    let rep: AcceleratorReply;
    if (this.opts.serialize) {
      const frame = encodeMessage(req);
      this.stats.bytes += frame.length;
      rep = this.acc.handle(decodeMessage(frame) as AcceleratorRequest);
      const back = encodeMessage(rep);
      this.stats.bytes += back.length;
      rep = decodeMessage(back) as AcceleratorReply;
    } else {
      rep = this.acc.handle(req);
      this.stats.bytes += payloadBytes(req) + payloadBytes(rep);
    }
    this.stats.messages++;
    observe(req, rep, this.observers);
    return rep;
  }
}

function payloadBytes(m: object): number {
  let n = 0;
  for (const v of Object.values(m)) if (v instanceof Float32Array) n += v.byteLength;
  return n;
}
