/** The enclave service's gRPC server: Attest, Upload (a stream of sealed chunks), Command, Health. */
import * as grpc from '@grpc/grpc-js';
import { widenServerWindow, widenSessionWindows } from '../rpc/grpc.js';
import { serviceError } from '../rpc/status.js';
import { TransportError } from '../errors.js';
import { ENCLAVE_SERVICE, enclaveServerOptions, type UploadChunk, type SealedCommand } from './protocol.js';
import { EnclaveService, MAX_UPLOAD_BYTES, type EnclaveServeOptions } from './enclave_service.js';

/** Starts the gRPC server of an EnclaveService. */
export async function serveEnclave(o: EnclaveServeOptions): Promise<{ service: EnclaveService; port: number; close(): Promise<void> }> {
  const service = await EnclaveService.create(o);
  const server = new grpc.Server(enclaveServerOptions());
  widenServerWindow(server);
  const wrap = (fn: (req: unknown) => Promise<unknown>) => (call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => {
    fn(call.request).then((v) => cb(null, v), (e: unknown) => cb(serviceError(e)));
  };
  server.addService(ENCLAVE_SERVICE, {
    Attest: wrap((r) => service.attest(r as { nonce?: unknown })),
    Command: wrap((r) => service.command(r as SealedCommand)),
    Health: wrap(async () => ({ status: 'SERVING', job: service.job?.state ?? null })),
    Upload: (call: grpc.ServerReadableStream<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => {
      const chunks: UploadChunk[] = [];
      let bytes = 0;
      let failed = false;
      call.on('data', (c: UploadChunk) => {
        bytes += JSON.stringify(c).length;
        if (bytes > MAX_UPLOAD_BYTES * 1.5 && !failed) {
          failed = true;
          cb(serviceError(new TransportError('upload too large', grpc.status.RESOURCE_EXHAUSTED)));
        }
        if (!failed) chunks.push(c);
      });
      call.on('end', () => {
        if (failed) return;
        service.upload(chunks).then((v) => cb(null, v), (e: unknown) => cb(serviceError(e)));
      });
      call.on('error', () => { failed = true; });
    },
  });
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(`${o.host ?? '127.0.0.1'}:${o.port ?? 0}`, grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
  });
  widenSessionWindows(server);
  return {
    service, port,
    close: async () => {
      await new Promise<void>((r) => server.tryShutdown(() => r()));
      await service.close();
    },
  };
}
