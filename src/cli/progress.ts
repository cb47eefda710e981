/**
 * Progress on stderr (stdout stays clean for --json output): a bar on a terminal; off a
 * terminal (piped, CI logs) one line every OBFUSCATUNE_PROGRESS_INTERVAL_MS (default 10 s)
 * and a last one at the end, each with the time so far and the estimate; with `--json`
 * those lines are JSON objects ({"event":"progress", ...}). OBFUSCATUNE_NO_PROGRESS=1 turns
 * it off.
 */
import cliProgress from 'cli-progress';

export interface Progress {
  update(value: number, payload?: Record<string, string | number>): void;
  setTotal(total: number): void;
  stop(): void;
}

let jsonLines = false;

/** `--json`: progress off a terminal as JSON lines (set by the command line before an action). */
export function setProgressJson(on: boolean): void {
  jsonLines = on;
}

/** One JSON line per interval and a last one at stop: {event, task, done, total, elapsed_s, eta_s, ...fields}. */
function jsonProgress(total: number, label: string, every: number): Progress {
  const t0 = performance.now();
  let done = 0;
  const fields: Record<string, string | number> = {};
  const line = () => {
    const s = (performance.now() - t0) / 1000;
    const eta = done >= total ? 0 : done > 0 ? (s * (total - done)) / done : null;
    const round = (x: number) => Math.round(x * 10) / 10;
    process.stderr.write(JSON.stringify({ event: 'progress', task: label, done, total, elapsed_s: round(s), eta_s: eta === null ? null : round(eta), ...fields }) + '\n');
  };
  const timer = setInterval(line, every);
  timer.unref();
  return {
    update: (v, payload) => {
      done = v;
      for (const [k, x] of Object.entries(payload ?? {})) if (x !== '') fields[k] = x;
    },
    setTotal: (t) => (total = t),
    stop: () => {
      clearInterval(timer);
      line();
    },
  };
}

export function progressBar(total: number, label: string, fields = ''): Progress {
  if (process.env.OBFUSCATUNE_NO_PROGRESS === '1') return { update() {}, setTotal() {}, stop() {} };
  const tty = process.stderr.isTTY === true;
  const ms = Number(process.env.OBFUSCATUNE_PROGRESS_INTERVAL_MS);
  const every = Number.isFinite(ms) && ms > 0 ? ms : 10_000;
  if (jsonLines && !tty) return jsonProgress(total, label, every);
  const bar = new cliProgress.SingleBar(
    {
      format: tty
        ? `${label} [{bar}] {value}/{total} {percentage}% ${fields} ETA {eta_formatted}`
        : `${label}: {value}/{total} ({percentage}%) ${fields} elapsed {duration_formatted}, ETA {eta_formatted}`,
      stream: process.stderr,
      hideCursor: true,
      clearOnComplete: false,
      etaBuffer: 20,
      noTTYOutput: !tty,
      notTTYSchedule: every,
    },
    cliProgress.Presets.shades_classic,
  );
  // the fields' tokens start empty (else the first line shows them raw)
  bar.start(total, 0, Object.fromEntries([...fields.matchAll(/\{(\w+)\}/g)].map((m) => [m[1], ''])));
  return {
    update: (v, payload) => bar.update(v, payload),
    setTotal: (t) => bar.setTotal(t),
    stop: () => bar.stop(),
  };
}
