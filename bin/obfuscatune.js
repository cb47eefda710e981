#!/usr/bin/env node
// Entry point of the `obfuscatune` command (compiled sources live in dist/).
import('../dist/src/cli/main.js')
  .then((m) => m.main(process.argv))
  .catch((err) => {
    if (err && err.code === 'ERR_MODULE_NOT_FOUND' && String(err.message).includes('dist/src/cli')) {
      console.error('obfuscatune: not built yet; run `npm install` (or `npm run build`) first');
    } else {
      console.error(`obfuscatune: ${err && err.message ? err.message : err}`);
      if (process.env.OBFUSCATUNE_DEBUG) console.error(err);
    }
    process.exit(1);
  });
