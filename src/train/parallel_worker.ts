/** Worker thread of ./parallel.ts: runs one range of an element-wise kernel per message. */
import { parentPort, workerData } from 'node:worker_threads';
import { adamwRange, sumSquaresRange, type AdamWArgs } from './kernels_ew.js';
import { geluForward, geluBackward, crossEntropyForward } from '../model/kernels.js';

const ctrl = new Int32Array(workerData.ctrl as SharedArrayBuffer);
const results = new Float64Array(workerData.results as SharedArrayBuffer);
const index = workerData.index as number;

interface Msg {
  op: string;
  args?: AdamWArgs;
  g?: Float32Array;
  a?: Float32Array;
  b?: Float32Array;
  c?: Float32Array;
  d?: Float32Array | null;
  t?: Int32Array;
  V?: number;
  lo: number;
  hi: number;
}

parentPort!.on('message', (msg: Msg) => {
  let r = 0;
  const { lo, hi } = msg;
  const n = hi - lo;
  try {
    switch (msg.op) {
      case 'adamw': adamwRange(msg.args!, lo, hi); break;
      case 'sumsq': r = sumSquaresRange(msg.g!, lo, hi); break;
      case 'gelu_fwd': geluForward(msg.a!.subarray(lo, hi), msg.b!.subarray(lo, hi), n, msg.d ? msg.d.subarray(lo, hi) : null); break;
      case 'gelu_bwd': geluBackward(msg.a!.subarray(lo, hi), msg.b!.subarray(lo, hi), msg.c!.subarray(lo, hi), n, msg.d ? msg.d.subarray(lo, hi) : null); break;
      case 'ce_fwd': {
        const V = msg.V!;
        const res = crossEntropyForward(msg.a!.subarray(lo * V, hi * V), msg.t!.subarray(lo, hi), msg.b!.subarray(lo, hi), n, V);
        r = res.loss * res.count;
        break;
      }
    }
  } finally {
    results[index] = r;
    Atomics.sub(ctrl, 0, 1);
    Atomics.notify(ctrl, 0);
  }
});
