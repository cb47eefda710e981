// Checks that every folder of src/ imports only folders below it (docs/architecture.md, "Layers").
// Exits non-zero and names each offending import. Usage: node scripts/check-layers.mjs
import { readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** Lowest first. A folder may import itself and any folder listed before it. */
export const LAYERS = [
  '.', 'tensor', 'io', 'linalg', 'model', 'protocol', 'obfuscate', 'accelerator', 'enclave', 'train',
  'attacks', 'tee', 'rpc', 'roles', 'report', 'bench', 'experiments', 'cli', 'api',
];

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const src = path.join(root, 'src');
const files = [];
(function walk(d) {
  for (const name of readdirSync(d)) {
    const p = path.join(d, name);
    if (statSync(p).isDirectory()) walk(p);
    else if (name.endsWith('.ts')) files.push(p);
  }
})(src);

const folderOf = (file) => {
  const rel = path.relative(src, file).split(path.sep);
  return rel.length === 1 ? '.' : rel[0];
};
const problems = [];
for (const f of files) {
  const from = folderOf(f);
  const rank = LAYERS.indexOf(from);
  if (rank < 0) { problems.push(`${path.relative(root, f)}: folder src/${from} is not in the layer list`); continue; }
  const text = readFileSync(f, 'utf8');
  for (const m of text.matchAll(/(?:\bfrom|\bimport)\s*\(?\s*['"](\.\.?\/[^'"]+)['"]/g)) {
    const target = path.resolve(path.dirname(f), m[1]);
    if (!target.startsWith(src + path.sep)) { problems.push(`${path.relative(root, f)} imports ${m[1]} outside src/`); continue; }
    const to = folderOf(target);
    if (LAYERS.indexOf(to) > rank) problems.push(`${path.relative(root, f)} (src/${from}) imports ${m[1]} (src/${to}, a higher layer)`);
  }
}
if (problems.length) {
  console.error(`layer check failed: ${problems.length} import(s) point up\n  ` + problems.join('\n  '));
  process.exit(1);
}
console.log(`layer check: ${files.length} files, ${LAYERS.length} layers, no upward import`);
