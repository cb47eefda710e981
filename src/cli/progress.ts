/**
 * Progress on stderr (stdout stays clean for --json output): a bar on a terminal; off a
 * terminal (piped, CI logs) a line at the start, then at most one every
 * OBFUSCATUNE_PROGRESS_INTERVAL_MS (default 10 s) as the work advances (and on a timer while
 * the event loop is free), and a last one at the end, each with the time so far and the
 * estimate; with `--json` those lines are JSON objects ({"event":"progress", ...}).
 * OBFUSCATUNE_NO_PROGRESS=1 turns it off.
 */
import cliProgress from 'cli-progress';

export interface Progress {
  update(value: number, payload?: Record<string, string | number>): void;
  setTotal(total: number): void;
  /** An `onProgress(done, total, label)` callback: sets the total, then the value and the label. */
  track: (done: number, total: number, label?: string) => void;
  stop(): void;
}

let jsonLines = false;

/** `--json`: progress off a terminal as JSON lines (set by the command line before an action). */
export function setProgressJson(on: boolean): void {
  jsonLines = on;
}

function duration(s: number | null): string {
  if (s === null) return '-';
  const r = Math.round(s);
  return r < 60 ? `${r}s` : r < 3600 ? `${Math.floor(r / 60)}m${String(r % 60).padStart(2, '0')}s` : `${Math.floor(r / 3600)}h${String(Math.floor(r / 60) % 60).padStart(2, '0')}m`;
}

/** Off a terminal: lines driven by the updates (a busy loop gives timers no turn) and by a timer. */
function lineProgress(total: number, label: string, fields: string, every: number, json: boolean): Omit<Progress, 'track'> {
  const t0 = performance.now();
  let done = 0;
  let last = -Infinity;
  let stopped = false;
  const payload: Record<string, string | number> = {};
  const line = () => {
    last = performance.now();
    const s = (last - t0) / 1000;
    const eta = done >= total ? 0 : done > 0 ? (s * (total - done)) / done : null;
    const pct = total > 0 ? Math.floor((100 * done) / total) : 0;
    const round = (x: number) => Math.round(x * 10) / 10;
    process.stderr.write((json
      ? JSON.stringify({ event: 'progress', task: label, done, total, elapsed_s: round(s), eta_s: eta === null ? null : round(eta), ...payload })
      : `${label}: ${done}/${total} (${pct}%) ${fields.replace(/\{(\w+)\}/g, (_, k: string) => String(payload[k] ?? ''))} elapsed ${duration(s)}, ETA ${duration(eta)}`) + '\n');
  };
  const timer = setInterval(line, every);
  timer.unref();
  line();
  return {
    update: (v, p) => {
      done = v;
      for (const [k, x] of Object.entries(p ?? {})) if (x !== '') payload[k] = x;
      if (performance.now() - last >= every) line();
    },
    setTotal: (t) => (total = t),
    stop: () => {
      if (stopped) return;
      stopped = true;
      clearInterval(timer);
      line();
    },
  };
}

export function progressBar(total: number, label: string, fields = ''): Progress {
  const p = barOf(total, label, fields);
  return { ...p, track: (d, n, l) => {
    p.setTotal(n);
    p.update(d, l === undefined ? undefined : { label: l });
  } };
}

function barOf(total: number, label: string, fields: string): Omit<Progress, 'track'> {
  if (process.env.OBFUSCATUNE_NO_PROGRESS === '1') return { update() {}, setTotal() {}, stop() {} };
  const ms = Number(process.env.OBFUSCATUNE_PROGRESS_INTERVAL_MS);
  const every = Number.isFinite(ms) && ms > 0 ? ms : 10_000;
  if (process.stderr.isTTY !== true) return lineProgress(total, label, fields, every, jsonLines);
  const bar = new cliProgress.SingleBar(
    { format: `${label} [{bar}] {value}/{total} {percentage}% ${fields} ETA {eta_formatted}`, stream: process.stderr, hideCursor: true, clearOnComplete: false, etaBuffer: 20 },
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
