/** CLI: the services (accelerator, enclave) and the parties' clients (provider, owner). */
import { Command, Option } from 'commander';
import { serveAccelerator } from '../roles/accelerator_service.js';
import { EVIL_MODES } from '../split/accelerator.js';
import { parseIntArg } from './model_args.js';

/** Stops a service cleanly on SIGINT/SIGTERM. */
export function onShutdown(close: () => Promise<void>): void {
  let closing = false;
  const stop = (sig: string) => {
    if (closing) return;
    closing = true;
    console.error(`received ${sig}, shutting down`);
    close().then(() => process.exit(0), () => process.exit(1));
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));
}

export function addServiceCommands(program: Command): void {
  const acc = program.command('accelerator').description('the untrusted accelerator service');
  acc
    .command('serve')
    .description('serve an accelerator bundle over gRPC (prints {"event":"listening","port":P} when ready)')
    .requiredOption('--bundle <dir>', 'accelerator bundle directory')
    .option('--host <host>', 'listen address', '127.0.0.1')
    .option('--port <n>', 'port (0 = ephemeral)', parseIntArg('--port'), 50551)
    .option('--state-dir <dir>', 'where the accelerator keeps its checkpoints')
    .addOption(new Option('--evil <mode>', 'simulate a lying accelerator (tests and demos)').choices(EVIL_MODES))
    .option('--max-message-mb <n>', 'largest accepted message', parseIntArg('--max-message-mb'), 256)
    .action(async (o) => {
      const { server } = await serveAccelerator(o);
      console.log(JSON.stringify({ event: 'listening', role: 'accelerator', port: server.port, evil: o.evil ?? null }));
      console.error(`accelerator serving ${o.bundle} on ${server.address}${o.evil ? ` (EVIL: ${o.evil})` : ''}`);
      onShutdown(() => server.close());
    });
}
