/**
 * `obfuscatune bench transport`: what the networked split pays for moving tensors, apart
 * from everything else. Replays the frames of one LoRA step (forward of every linear with
 * `save`, input-only backward; rows = batch x seq) against
 *   - an accelerator process that answers zero tensors without computing (transport alone),
 *     over the tensor channel and over gRPC;
 *   - a real accelerator (random-init obfuscated weights), in-process and in a child process
 *     over the tensor channel (transport plus the serving process's own costs).
 */
import { getPreset } from '../model/config.js';
import { GPT2 } from '../model/gpt2.js';
import { obfuscateWeights } from '../obfuscate/provider.js';
import { LINEARS, linearDims, type LinearName } from '../model/block.js';
import { Accelerator } from '../accelerator/accelerator.js';
import { asObfuscated, type AcceleratorReply, type AcceleratorRequest } from '../protocol/messages.js';
import { startAcceleratorServer } from '../rpc/accelerator_server.js';
import { GrpcAcceleratorLink } from '../rpc/accelerator_client.js';
import { spawnService, spawnedAcceleratorLink } from '../roles/spawn.js';
import { median } from './train_step.js';
import { Rng } from '../tensor/rng.js';

export interface TransportBenchRow {
  path: string;
  step_ms_median: number;
  step_ms_min: number;
  mb_per_step: number;
}

/** The hidden `bench echo-accelerator` process: answers every linear with zeros of the right shape. */
export async function serveEchoAccelerator(preset: string, tensorChannel: boolean): Promise<void> {
  const d = getPreset(preset).n_embd;
  const srv = await startAcceleratorServer({
    handle: (r: AcceleratorRequest): AcceleratorReply => {
      if (r.op === 'linear_forward' || r.op === 'linear_backward') {
        const [din, dout] = linearDims(r.name as LinearName, d);
        const cols = r.op === 'linear_forward' ? dout : din;
        return { op: 'tensor', rows: r.rows, cols, data: new Float32Array(r.rows * cols) };
      }
      return { op: 'ack' };
    },
  }, { tensorChannel });
  console.log(JSON.stringify({ event: 'listening', port: srv.port }));
}

async function spawnEcho(preset: string, tensorChannel: boolean): Promise<{ link: GrpcAcceleratorLink; stop: () => Promise<void> }> {
  const child = await spawnService(['bench', 'echo-accelerator', '--preset', preset, ...(tensorChannel ? [] : ['--no-tensor-channel'])], { label: 'echo accelerator' });
  const link = new GrpcAcceleratorLink(`127.0.0.1:${child.port}`, { tensorChannel });
  await link.waitForReady(30_000);
  return { link, stop: () => child.kill() };
}

export async function benchTransport(o: { model: string; batch: number; seq: number; steps: number; onProgress?: (i: number, n: number, label: string) => void }): Promise<{ model: string; batch: number; seq: number; steps: number; rows: TransportBenchRow[] }> {
  const c = getPreset(o.model);
  const d = c.n_embd, L = c.n_layer, n = o.batch * o.seq;
  const rng = new Rng(5);
  const inputs = new Map<LinearName, [Float32Array, Float32Array]>();
  for (const name of LINEARS) {
    const [din, dout] = linearDims(name, d);
    inputs.set(name, [Float32Array.from({ length: n * din }, () => rng.normal() * 0.5), Float32Array.from({ length: n * dout }, () => rng.normal() * 0.01)]);
  }
  // fresh tensors per call, as the enclave produces them (random: marked obfuscated by hand)
  const frames = (): AcceleratorRequest[] => {
    const out: AcceleratorRequest[] = [];
    for (let l = 0; l < L; l++) for (const name of LINEARS) out.push({ op: 'linear_forward', layer: l, name, rows: n, x: asObfuscated(Float32Array.from(inputs.get(name)![0])), save: true });
    for (let l = L - 1; l >= 0; l--) for (const name of [...LINEARS].reverse()) out.push({ op: 'linear_backward', layer: l, name, rows: n, dy: asObfuscated(Float32Array.from(inputs.get(name)![1])), input: true, weight: false });
    return out;
  };
  // every linear's frames, forward and backward: its input and output rows of 4-byte floats
  const bytes = 2 * L * LINEARS.reduce((a, name) => a + 4 * n * (linearDims(name, d)[0] + linearDims(name, d)[1]), 0);
  const time = async (path: string, call: (r: AcceleratorRequest) => Promise<AcceleratorReply> | AcceleratorReply): Promise<TransportBenchRow> => {
    const t: number[] = [];
    for (let s = 0; s <= o.steps; s++) {
      const fs = frames();
      const t0 = performance.now();
      for (const f of fs) {
        const r = await call(f);
        if (r.op === 'error') throw new Error(`${path}: ${r.message}`);
      }
      if (s > 0) t.push(performance.now() - t0);
    }
    return { path, step_ms_median: median(t), step_ms_min: Math.min(...t), mb_per_step: bytes / 1e6 };
  };
  const rows: TransportBenchRow[] = [];
  const total = 4;
  for (const [i, tc] of [true, false].entries()) {
    o.onProgress?.(i, total, `echo ${tc ? 'tensor channel' : 'grpc'}`);
    const e = await spawnEcho(o.model, tc);
    try {
      rows.push(await time(`echo accelerator, ${tc ? 'tensor channel' : 'gRPC'}`, (r) => e.link.call(r)));
    } finally {
      await e.link.close();
      await e.stop();
    }
  }
  const acc = obfuscateWeights(GPT2.random(c, 1).weights(), { mode: 'sealed', seed: 1 }).accelerator;
  o.onProgress?.(2, total, 'real accelerator in-process');
  const local = new Accelerator(acc);
  rows.push(await time('real accelerator, in-process', (r) => local.handle(r)));
  o.onProgress?.(3, total, 'real accelerator, child process');
  const link = await spawnedAcceleratorLink(acc);
  try {
    rows.push(await time('real accelerator, child process, tensor channel', (r) => link.call(r)));
  } finally {
    await link.close();
  }
  o.onProgress?.(total, total, 'done');
  return { model: o.model, batch: o.batch, seq: o.seq, steps: o.steps, rows };
}
