/**
 * The shared-memory protocol of ./parallel.ts, its workers and their supervisor.
 * ctrl (Int32Array): [0] jobs outstanding; [1 + i] status of worker i.
 */

/** no job (or its last one finished) */
export const STATUS_IDLE = 0;
/** a job was posted to it and has not finished */
export const STATUS_BUSY = 1;
/** its last job threw; the text is on its job port */
export const STATUS_FAILED = 2;
/** the thread is gone (set by the supervisor from the worker's 'exit' event) */
export const STATUS_DEAD = 3;

/** What the supervisor posts on its report port when a worker thread ends. */
export interface ExitReport {
  index: number;
  threadId: number;
  code: number;
  /** the uncaught error that ended it, if any */
  error: string | null;
}
