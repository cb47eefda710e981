/**
 * Worker thread of ./parallel.ts: runs one range of an element-wise kernel per message on
 * its job port. Whatever happens in the kernel, it reports back in shared memory: its result
 * slot, the count of outstanding jobs, then its status word (idle, or failed with the error
 * text posted on the port first). Its death, which it cannot report, is reported by the
 * supervisor thread that started it (./parallel_supervisor.ts).
 */
import { workerData, type MessagePort } from 'node:worker_threads';
import { RANGE_KERNELS, type RangeOp } from './kernels_ew.js';

import { STATUS_FAILED, STATUS_IDLE } from './parallel_shared.js';

const ctrl = new Int32Array(workerData.ctrl as SharedArrayBuffer);
const results = new Float64Array(workerData.results as SharedArrayBuffer);
const index = workerData.index as number;
const port = workerData.port as MessagePort;

interface Msg {
  op: RangeOp | 'test_busy' | 'test_fail_next';
  args: never;
  lo: number;
  hi: number;
  /** test_busy: how long to stay busy */
  ms?: number;
}

/** set by the test op `test_fail_next`: the next kernel throws */
let failNext = false;

port.on('message', (msg: Msg) => {
  // test hooks (parallelTestHooks in ./parallel.ts): none of them is a job
  if (msg.op === 'test_busy') {
    const end = Date.now() + (msg.ms ?? 0);
    while (Date.now() < end) {
      // a worker stuck in a kernel, until it is terminated or the time is up
    }
    return;
  }
  if (msg.op === 'test_fail_next') {
    failNext = true;
    return;
  }
  let r = 0;
  let error: string | null = null;
  try {
    if (failNext) {
      failNext = false;
      throw new Error('kernel failure injected by a test');
    }
    if (!Object.hasOwn(RANGE_KERNELS, msg.op)) throw new Error(`unknown kernel "${msg.op}"`);
    r = (RANGE_KERNELS[msg.op as RangeOp] as (a: never, lo: number, hi: number) => number)(msg.args, msg.lo, msg.hi);
  } catch (e) {
    error = e instanceof Error ? e.message : String(e);
  }
  results[index] = r;
  // the text first: the status tells the main thread there is one to read; the count
  // before the status, so that the count is settled once no worker is busy
  if (error !== null) port.postMessage({ error });
  Atomics.sub(ctrl, 0, 1);
  Atomics.store(ctrl, 1 + index, error === null ? STATUS_IDLE : STATUS_FAILED);
  Atomics.notify(ctrl, 0);
});
