/** Worker thread of ./parallel.ts: runs one range of an element-wise kernel per message. */
import { parentPort, workerData } from 'node:worker_threads';
import { adamwRange, sumSquaresRange, type AdamWArgs } from './kernels_ew.js';

const ctrl = new Int32Array(workerData.ctrl as SharedArrayBuffer);
const results = new Float64Array(workerData.results as SharedArrayBuffer);
const index = workerData.index as number;

parentPort!.on('message', (msg: { op: string; args?: AdamWArgs; g?: Float32Array; lo: number; hi: number }) => {
  let r = 0;
  try {
    if (msg.op === 'adamw') adamwRange(msg.args!, msg.lo, msg.hi);
    else if (msg.op === 'sumsq') r = sumSquaresRange(msg.g!, msg.lo, msg.hi);
  } finally {
    results[index] = r;
    Atomics.sub(ctrl, 0, 1);
    Atomics.notify(ctrl, 0);
  }
});
