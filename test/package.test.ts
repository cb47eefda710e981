// The package as users get it: what `npm pack` ships (compiled code and declarations, the
// native sources and their build script, no models or data, under 5 MB), and the library
// example run from the unpacked tarball, importing the package by name.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import os from 'node:os';
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const npm = (args: string[], cwd = ROOT) => execFileSync('npm', args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

test('npm pack ships dist/ with declarations, the native sources and build script, no models or data, under 5 MB', () => {
  // --ignore-scripts: the suite has just built dist/ (pack would run `prepare`, a second build)
  const [p] = JSON.parse(npm(['pack', '--dry-run', '--json', '--ignore-scripts'])) as { files: { path: string }[]; unpackedSize: number; size: number }[];
  const files = new Set(p.files.map((f) => f.path));
  const pkg = JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8'));
  const entry = pkg.exports['.'];
  for (const f of [entry.default, entry.types, pkg.types, pkg.bin.obfuscatune].map((x: string) => x.replace(/^\.\//, ''))) assert.ok(files.has(f), `${f} is packed`);
  for (const f of ['dist/src/cli/main.js', 'dist/src/tensor/parallel_worker.js', 'scripts/build-native.mjs', 'native/binding.gyp', 'docs/api.md', 'examples/library.mjs']) assert.ok(files.has(f), `${f} is packed`);
  // every source the install script compiles
  const gyp = JSON.parse(readFileSync(path.join(ROOT, 'native/binding.gyp'), 'utf8')) as { targets: { sources: string[] }[] };
  const sources = gyp.targets.flatMap((t) => t.sources);
  assert.ok(sources.length > 0);
  for (const s of sources) assert.ok(files.has(`native/${s}`), `native/${s} is packed`);
  assert.equal(pkg.scripts.install, 'node scripts/build-native.mjs');
  const left = [...files].filter((f) => /^(models|data|report|runs|test|dist\/test|native\/build|node_modules)\//.test(f) || f.endsWith('.safetensors'));
  assert.deepEqual(left, [], 'no models, data, tests or build outputs');
  assert.ok(p.unpackedSize < 5e6, `unpacked ${p.unpackedSize} bytes`);
});

test('the library example runs from the packed tarball, importing the package by name', () => {
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'obf-pack-'));
  try {
    const name = npm(['pack', '--ignore-scripts', '--pack-destination', tmp]).trim().split('\n').pop()!;
    execFileSync('tar', ['xzf', path.join(tmp, name), '-C', tmp]);
    const pkgDir = path.join(tmp, 'package');
    // what `npm install` adds: the dependencies and the addon its install script builds
    symlinkSync(path.join(ROOT, 'node_modules'), path.join(pkgDir, 'node_modules'), 'dir');
    const addon = path.join(ROOT, 'native/build/Release/obfuscatune_native.node');
    if (existsSync(addon)) {
      mkdirSync(path.join(pkgDir, 'native/build/Release'), { recursive: true });
      copyFileSync(addon, path.join(pkgDir, 'native/build/Release/obfuscatune_native.node'));
    }
    const out = execFileSync(process.execPath, [path.join(pkgDir, 'examples/library.mjs'), path.join(ROOT, 'test/fixtures/vocab50257'), path.join(ROOT, 'data/wordnet-supersense/train.jsonl')], {
      cwd: tmp, encoding: 'utf8', env: { ...process.env, OBFUSCATUNE_NO_PROGRESS: '1' },
    });
    const r = JSON.parse(out.trim().split('\n').pop()!);
    assert.ok(r.split_vs_plain_max_abs_logit_diff < 1e-4, `split vs plain ${r.split_vs_plain_max_abs_logit_diff}`);
    assert.equal(r.generated, 4);
    assert.ok(r.boundary_messages > 0);
    assert.equal(r.finetune.steps, 2);
    assert.equal(r.finetune.losses.length, 2);
    assert.ok(r.finetune.losses.every(Number.isFinite));
    assert.ok(Math.abs(r.merged_eval_loss - r.finetune.eval_loss) < 1e-4, `the merged plain model scores as the split one: ${r.merged_eval_loss} vs ${r.finetune.eval_loss}`);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});
