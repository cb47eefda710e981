#!/usr/bin/env node
// Entry point of the `obfuscatune` command (compiled sources live in dist/).
import { existsSync } from 'node:fs';

const entry = new URL('../dist/src/cli/main.js', import.meta.url);
if (!existsSync(entry)) {
  console.error('obfuscatune: not built yet; run `npm install` (or `npm run build`) first');
  process.exit(1);
}
import(entry.href)
  .then((m) => m.main(process.argv))
  .catch(async (err) => {
    console.error(`obfuscatune: ${err && err.message ? err.message : err}`);
    if (process.env.OBFUSCATUNE_DEBUG) console.error(err);
    // the exit status follows the error's class (src/cli/main.ts exitCodeOf)
    let code = 1;
    try {
      code = (await import(entry.href)).exitCodeOf(err);
    } catch {
      // the module itself failed to load
    }
    process.exit(code);
  });
