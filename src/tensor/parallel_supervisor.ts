/**
 * Supervisor thread of ./parallel.ts. The main thread blocks in Atomics.wait while the
 * kernel workers run, so it cannot see a worker's 'exit' event in time; this thread starts
 * the workers and, its own event loop being free, sees each one end: it marks the worker
 * dead in shared memory, wakes the main thread, and posts why on the report port.
 */
import { Worker, parentPort, workerData, type MessagePort } from 'node:worker_threads';
import { STATUS_DEAD, type ExitReport } from './parallel_shared.js';

const ctrl = new Int32Array(workerData.ctrl as SharedArrayBuffer);
const ports = workerData.ports as MessagePort[];
const reports = workerData.reports as MessagePort;

const workers = ports.map((port, index) => {
  const w = new Worker(new URL('./parallel_worker.js', import.meta.url), {
    workerData: { ctrl: workerData.ctrl, results: workerData.results, index, port },
    transferList: [port],
  });
  const threadId = w.threadId;
  let error: string | null = null;
  w.on('error', (e) => {
    error = e instanceof Error ? e.message : String(e);
  });
  w.on('exit', (code) => {
    Atomics.store(ctrl, 1 + index, STATUS_DEAD);
    const r: ExitReport = { index, threadId, code, error };
    reports.postMessage(r);
    Atomics.notify(ctrl, 0);
  });
  return w;
});

// test hook (parallelTestHooks in ./parallel.ts): terminate a worker after a delay
parentPort!.on('message', (m: { op: string; index: number; afterMs: number }) => {
  if (m.op === 'terminate') setTimeout(() => void workers[m.index]?.terminate(), m.afterMs);
});
