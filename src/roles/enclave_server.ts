/** The enclave service's gRPC server: Attest, Upload (a stream of sealed chunks), Command, Health. */
import * as grpc from '@grpc/grpc-js';
import { bindServer, serverOptions } from '../rpc/grpc.js';
import { serveStream, serveUnary } from '../rpc/status.js';
import { TransportError } from '../errors.js';
import { ENCLAVE_SERVICE, MAX_CLIENT_MESSAGE_BYTES, type UploadChunk, type SealedCommand } from './protocol.js';
import { EnclaveService, MAX_UPLOAD_BYTES, type EnclaveServeOptions } from './enclave_service.js';

export async function serveEnclave(o: EnclaveServeOptions): Promise<{ service: EnclaveService; port: number; close(): Promise<void> }> {
  const service = await EnclaveService.create(o);
  const server = new grpc.Server(serverOptions({ maxMessageBytes: MAX_CLIENT_MESSAGE_BYTES }));
  server.addService(ENCLAVE_SERVICE, {
    Attest: serveUnary((r) => service.attest(r as { nonce?: unknown })),
    Command: serveUnary((r) => service.command(r as SealedCommand)),
    Health: serveUnary(async () => ({ status: 'SERVING', job: service.job?.state ?? null })),
    Upload: (call: grpc.ServerReadableStream<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => {
      const chunks: UploadChunk[] = [];
      let bytes = 0;
      serveStream<UploadChunk>(call, cb, (c) => {
        bytes += JSON.stringify(c).length;
        if (bytes > MAX_UPLOAD_BYTES * 1.5) throw new TransportError('upload too large', grpc.status.RESOURCE_EXHAUSTED);
        chunks.push(c);
      }, () => service.upload(chunks));
    },
  });
  const port = await bindServer(server, `${o.host ?? '127.0.0.1'}:${o.port ?? 0}`, grpc.ServerCredentials.createInsecure());
  return {
    service, port,
    close: async () => {
      await new Promise<void>((r) => server.tryShutdown(() => r()));
      await service.close();
    },
  };
}
