// Builds the native GEMM addon with node-gyp during `npm install`.
// A failed build is not fatal: obfuscatune then runs on its pure-TypeScript
// kernels, and says so loudly here and in `obfuscatune info`.
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
if (process.env.OBFUSCATUNE_SKIP_NATIVE === '1') {
  console.log('obfuscatune: OBFUSCATUNE_SKIP_NATIVE=1, not building the native addon');
  process.exit(0);
}
const require = createRequire(import.meta.url);
let gyp;
try {
  gyp = require.resolve('node-gyp/bin/node-gyp.js', { paths: [path.dirname(process.execPath), root] });
} catch {
  // npm ships node-gyp; fall back to the one next to npm.
  const npmDir = path.resolve(path.dirname(process.execPath), '../lib/node_modules/npm');
  gyp = path.join(npmDir, 'node_modules/node-gyp/bin/node-gyp.js');
}
// npm passes its nodedir (the local Node headers) to install scripts; pass it on when run by
// hand too, so node-gyp never tries to download headers
let nodedir = process.env.npm_config_nodedir;
if (!nodedir) {
  const r = spawnSync('npm', ['config', 'get', 'nodedir'], { encoding: 'utf8' });
  const v = (r.stdout || '').trim();
  if (r.status === 0 && v && v !== 'undefined' && v !== 'null') nodedir = v;
}
const args = [gyp, 'rebuild', '--directory', path.join(root, 'native')];
if (nodedir) args.push(`--nodedir=${nodedir}`);
const res = spawnSync(process.execPath, args, {
  stdio: 'inherit',
  env: process.env,
});
if (res.status !== 0) {
  console.warn('\nobfuscatune: WARNING: the native GEMM addon failed to build; the pure-TypeScript backend will be used (much slower).\n');
}
