/**
 * GEMM benchmark on the linear layers of GPT-2 124M, native and TypeScript backends beside
 * numpy's matmul (OpenBLAS) as a reference.
 *
 * For each token count t and each linear (in -> out) it times the three products of a
 * training step, as GEMMs C[m,n] = op(A)[m,k] op(B)[k,n]:
 *   nn  forward          Y[t,out]  = X[t,in] W[in,out]          m=t,  k=in,  n=out
 *   nt  backward input   dX[t,in]  = dY[t,out] W^T              m=t,  k=out, n=in
 *   tn  backward weight  dW[in,out] = X^T dY                    m=in, k=t,   n=out
 *
 * Native and numpy timings are interleaved shape by shape, in several rounds, so that load
 * from other processes hits both alike; each figure is the median over rounds of the median
 * call time. numpy runs in a child process (scripts/numpy_gemm.py --serve) with the same
 * thread count and without the OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE overrides this project's
 * environment may set (they pin OpenBLAS to slower kernels); the parent's environment is
 * left alone. The TypeScript backend is timed with one call, after a warm-up call on a small
 * product of the same kind (it is slow: about 2 minutes for all shapes at t=1024).
 */
import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { createInterface, type Interface } from 'node:readline';
import path from 'node:path';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Rng } from '../tensor/rng.js';
import { median } from './train_step.js';
import { availableBackends, backendName, nativeInfo, setBackend, setThreads, sgemm, type BackendName } from '../tensor/gemm.js';

export interface GemmBenchRow {
  m: number;
  k: number;
  n: number;
  op: 'nn' | 'nt' | 'tn';
  layer: string;
  gflops: number;
  js_gflops: number | null;
  reference: 'numpy' | null;
  reference_gflops: number | null;
}

export interface GemmBenchResult {
  backend: 'native' | 'js';
  threads: number;
  isa: string | null;
  results: GemmBenchRow[];
}

export interface GemmBenchOptions {
  tokens?: number[];
  quick?: boolean;
  threads?: number;
  js?: boolean;
  reference?: boolean;
  onProgress?: (done: number, total: number, label: string) => void;
}

/** GPT-2 124M linears (in -> out). */
const LAYERS: { name: string; din: number; dout: number }[] = [
  { name: 'attn.c_attn', din: 768, dout: 2304 },
  { name: 'attn.c_proj', din: 768, dout: 768 },
  { name: 'mlp.c_fc', din: 768, dout: 3072 },
  { name: 'mlp.c_proj', din: 3072, dout: 768 },
  { name: 'lm_head', din: 768, dout: 50257 },
];

type Shape = Pick<GemmBenchRow, 'm' | 'k' | 'n' | 'op' | 'layer'>;

export function gemmBenchShapes(tokens: number[]): Shape[] {
  return tokens.flatMap((t) => LAYERS.flatMap(({ name: layer, din, dout }): Shape[] => [
    { m: t, k: din, n: dout, op: 'nn', layer }, { m: t, k: dout, n: din, op: 'nt', layer }, { m: din, k: t, n: dout, op: 'tn', layer },
  ]));
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function filled(n: number, seed: number): Float32Array {
  const a = new Float32Array(n);
  new Rng(seed).fillNormal(a, 0.3);
  return a;
}

/** A call of op(A) op(B) on filled operands of the shape. */
function operands(s: Shape): { run: () => void } {
  const ta = s.op[0] === 't', tb = s.op[1] === 't';
  const A = filled(s.m * s.k, 1), B = filled(s.k * s.n, 2), C = new Float32Array(s.m * s.n);
  const lda = ta ? s.m : s.k, ldb = tb ? s.k : s.n;
  return { run: () => sgemm(ta, tb, s.m, s.n, s.k, 1, A, lda, B, ldb, 0, C, s.n) };
}

/** Median seconds per call over at least `minReps` calls and `minTime` seconds (after one warm-up call). */
function timeCalls(run: () => void, minTime: number, minReps: number, warm = true): number {
  if (warm) run();
  let t0 = performance.now();
  run();
  const first = (performance.now() - t0) / 1e3;
  const reps = Math.min(100000, Math.max(minReps, Math.ceil(minTime / Math.max(first, 1e-9))));
  const times: number[] = [first];
  for (let r = 1; r < reps; r++) {
    t0 = performance.now();
    run();
    times.push((performance.now() - t0) / 1e3);
  }
  return median(times);
}

/** A numpy child process answering one shape per line. */
class NumpyReference {
  private rl: Interface;
  private lines: AsyncIterator<string>;
  private constructor(private proc: ChildProcessWithoutNullStreams) {
    this.rl = createInterface({ input: proc.stdout });
    this.lines = this.rl[Symbol.asyncIterator]();
  }

  /** The child's next line (an error line once it has exited). */
  private async next(): Promise<string> {
    const l = await this.lines.next();
    return l.done ? '{"error":"numpy process exited"}' : l.value;
  }

  /** Starts the child, or returns null when scripts/numpy_gemm.py, python3 or numpy is missing, or it does not start. */
  static async start(threads: number, minTime: number): Promise<NumpyReference | null> {
    const script = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../scripts/numpy_gemm.py');
    if (!existsSync(script)) return null;
    const env: NodeJS.ProcessEnv = { ...process.env };
    // Only in the child: these pin OpenBLAS to older, slower kernels / cache sizes.
    delete env.OPENBLAS_CORETYPE;
    delete env.OPENBLAS_L2_SIZE;
    for (const k of ['OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS']) env[k] = String(threads);
    const probe = spawnSync('python3', ['-c', 'import numpy'], { env, stdio: 'ignore' });
    if (probe.error || probe.status !== 0) return null;
    const proc = spawn('python3', [script, '--serve', '--min-time', String(minTime)], { env, stdio: ['pipe', 'pipe', 'pipe'] });
    proc.stderr.resume();
    const ref = new NumpyReference(proc);
    const hello = await ref.next();
    try {
      if (JSON.parse(hello).ready) return ref;
    } catch {
      // not a JSON line: the child failed before it could answer
    }
    ref.close();
    return null;
  }

  async time(s: Shape, reps: number): Promise<number | null> {
    this.proc.stdin.write(JSON.stringify({ m: s.m, k: s.k, n: s.n, op: s.op, reps }) + '\n');
    const line = await this.next();
    try {
      const r = JSON.parse(line) as { gflops?: number };
      return typeof r.gflops === 'number' ? r.gflops : null;
    } catch {
      return null;
    }
  }

  close(): void {
    this.proc.stdin.end();
    this.rl.close();
  }
}

const round2 = (x: number) => Math.round(x * 100) / 100;

export async function benchGemm(opts: GemmBenchOptions = {}): Promise<GemmBenchResult> {
  const tokens = opts.tokens ?? [256, 1024];
  for (const t of tokens) if (!Number.isInteger(t) || t < 1) throw new Error(`benchGemm: token counts must be positive integers, got ${t}`);
  const { quick = false, js: wantJs = true, reference: wantRef = true } = opts;
  const hasNative = availableBackends().includes('native');
  const backend: BackendName = hasNative ? 'native' : 'js';
  const prevBackend = backendName();
  const prevThreads = nativeInfo()?.threads ?? 1;
  const threads = opts.threads ?? prevThreads;
  if (hasNative) setThreads(threads);

  const rounds = quick ? 1 : 3;
  const perRound = quick ? 0.1 : 0.15; // seconds of native calls per round (>= 0.3 s per shape in full mode)
  const jsMaxFlops = quick ? 2e9 : Infinity; // --quick times the TypeScript backend on small shapes only

  const shapes = gemmBenchShapes(tokens);
  const total = shapes.length;
  const ref = wantRef ? await NumpyReference.start(hasNative ? threads : 1, perRound) : null;

  const results: GemmBenchRow[] = [];
  try {
    for (let i = 0; i < shapes.length; i++) {
      const s = shapes[i];
      const label = `${s.layer} ${s.op} ${s.m}x${s.k}x${s.n}`;
      opts.onProgress?.(i, total, label);
      const flops = 2 * s.m * s.n * s.k;
      const ops = operands(s);
      const mine: number[] = [];
      const theirs: number[] = [];
      const timeRef = async () => {
        const g = await ref!.time(s, 3);
        if (g !== null) theirs.push(g);
      };
      if (backend === 'native') {
        setBackend('native');
        for (let r = 0; r < rounds; r++) {
          if (ref) {
            await timeRef();
            await sleep(300); // OpenBLAS's threads spin ~0.15 s after a call: let them go idle
          }
          mine.push(flops / timeCalls(ops.run, perRound, 3, r === 0) / 1e9);
        }
      } else if (ref) await timeRef();
      let js: number | null = null;
      if ((wantJs || backend === 'js') && flops <= jsMaxFlops) {
        setBackend('js');
        // Warm the JIT on a small product of the same kind, then time one full call.
        operands({ ...s, m: Math.min(s.m, 16), k: Math.min(s.k, 256), n: Math.min(s.n, 256) }).run();
        js = flops / timeCalls(ops.run, 0, 1, false) / 1e9;
      }
      const gflops = backend === 'native' ? median(mine) : js;
      results.push({
        m: s.m, k: s.k, n: s.n, op: s.op, gflops: gflops === null ? 0 : round2(gflops), js_gflops: js === null ? null : round2(js),
        reference: theirs.length ? 'numpy' : null, reference_gflops: theirs.length ? round2(median(theirs)) : null, layer: s.layer,
      });
    }
    opts.onProgress?.(total, total, 'done');
  } finally {
    ref?.close();
    if (hasNative) setThreads(prevThreads);
    setBackend(prevBackend);
  }
  // Key order: backend, threads, results first (tools read these), then the extras.
  return { backend, threads: hasNative ? threads : 1, results, isa: nativeInfo()?.isa ?? null } as GemmBenchResult;
}

export function formatGemmBench(r: GemmBenchResult): string {
  const lines: string[] = [];
  const hasRef = r.results.some((x) => x.reference_gflops !== null);
  const hasJs = r.results.some((x) => x.js_gflops !== null);
  lines.push(`GEMM (fp32) on GPT-2 124M linears: ${r.backend} backend${r.isa ? ` (${r.isa})` : ''}, ${r.threads} thread${r.threads === 1 ? '' : 's'}` +
    (hasRef ? `; reference numpy matmul with the same thread count` : ''));
  lines.push('nn = forward X W, nt = backward input dY W^T, tn = backward weight X^T dY; C is m x n, reduction k', '');
  const head = ['layer', 'op', 'm', 'k', 'n', `${r.backend} GFLOPS`];
  if (hasRef) head.push('numpy GFLOPS', 'ratio');
  if (hasJs && r.backend === 'native') head.push('js GFLOPS');
  const rows: string[][] = [head];
  const ratios: number[] = [];
  for (const x of r.results) {
    const row = [x.layer, x.op, String(x.m), String(x.k), String(x.n), x.gflops.toFixed(1)];
    if (hasRef) {
      if (x.reference_gflops !== null && x.reference_gflops > 0) {
        const q = x.gflops / x.reference_gflops;
        ratios.push(q);
        row.push(x.reference_gflops.toFixed(1), q.toFixed(2));
      } else row.push('-', '-');
    }
    if (hasJs && r.backend === 'native') row.push(x.js_gflops === null ? '-' : x.js_gflops.toFixed(2));
    rows.push(row);
  }
  const widths = head.map((_, c) => Math.max(...rows.map((row) => row[c].length)));
  for (const row of rows) lines.push(row.map((cell, c) => (c < 2 ? cell.padEnd(widths[c]) : cell.padStart(widths[c]))).join('  '));
  if (ratios.length) {
    const geo = Math.exp(ratios.reduce((a, q) => a + Math.log(q), 0) / ratios.length);
    lines.push('', `ratio ${r.backend}/numpy: geometric mean ${geo.toFixed(2)}, min ${Math.min(...ratios).toFixed(2)}, max ${Math.max(...ratios).toFixed(2)}`);
  }
  return lines.join('\n');
}
