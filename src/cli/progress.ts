/**
 * Progress on stderr (stdout stays clean for --json output): a bar on a terminal; off a
 * terminal (piped, CI logs) one line every OBFUSCATUNE_PROGRESS_INTERVAL_MS (default 10 s)
 * and a last one at the end, each with the time so far and the estimate.
 * OBFUSCATUNE_NO_PROGRESS=1 turns it off.
 */
import cliProgress from 'cli-progress';

export interface Progress {
  update(value: number, payload?: Record<string, string | number>): void;
  setTotal(total: number): void;
  stop(): void;
}

export function progressBar(total: number, label: string, fields = ''): Progress {
  if (process.env.OBFUSCATUNE_NO_PROGRESS === '1') return { update() {}, setTotal() {}, stop() {} };
  const tty = process.stderr.isTTY === true;
  const every = Number(process.env.OBFUSCATUNE_PROGRESS_INTERVAL_MS);
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
      notTTYSchedule: Number.isFinite(every) && every > 0 ? every : 10_000,
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
