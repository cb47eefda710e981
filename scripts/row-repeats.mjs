#!/usr/bin/env node
// Where the accelerator sees repeated rows: for every linear's input in a recorded view
// (without token mixing), the share of the owner's rows that repeat a row seen before (equal
// on a grid of 1/64, as the frequency attack clusters them), at position 0 and after it.
// Run after `npm run build`:  node scripts/row-repeats.mjs VIEW [--json]
import { loadView, loadTruth } from '../dist/src/protocol/view.js';
import { rowKey } from '../dist/src/attacks/common.js';

const [file, flag] = process.argv.slice(2);
if (!file) { console.error('usage: node scripts/row-repeats.mjs VIEW [--json]'); process.exit(2); }
const view = loadView(file);
const truth = loadTruth(`${file}.truth.json`, view);
const starts = truth.batches.map((b) => b.call);
const batchOf = (call) => { let k = -1; for (let i = 0; i < starts.length && starts[i] <= call; i++) k = i; return k; };
const seen = new Map(), stats = new Map();
view.events.forEach((e, i) => {
  if (e.direction !== 'to_accelerator' || e.op !== 'linear_forward' || e.field !== 'x') return;
  const b = truth.batches[batchOf(e.call)];
  if (!b || b.tokens.length !== e.rows) return;
  const name = `h.${e.layer}.${e.name}`, keys = seen.get(name) ?? new Set(), s = stats.get(name) ?? { rows: 0, rep: 0, rows0: 0, rep0: 0 };
  const x = view.tensor(i);
  for (let r = 0; r < e.rows; r++) {
    if (truth.pad_token_id !== null && b.tokens[r] === truth.pad_token_id) continue;
    const k = rowKey(x, r * e.cols, e.cols), rep = keys.has(k);
    keys.add(k);
    if (b.pos[r] === 0) { s.rows0++; s.rep0 += rep ? 1 : 0; } else { s.rows++; s.rep += rep ? 1 : 0; }
  }
  seen.set(name, keys); stats.set(name, s);
});
const rows = [...stats].map(([name, s]) => ({ linear: name, rows: s.rows + s.rows0, repeated: (s.rep + s.rep0) / (s.rows + s.rows0), repeated_at_position_0: s.rep0 / (s.rows0 || 1), repeated_after_position_0: s.rep / (s.rows || 1) }));
if (flag === '--json') console.log(JSON.stringify({ view: file, batches: truth.batches.length, rows }, null, 1));
else {
  console.log(`${file}: ${truth.batches.length} batches; owner rows repeating an earlier row (all / at position 0 / after it)`);
  for (const r of rows) console.log(`${r.linear.padEnd(12)} ${String(r.rows).padStart(7)}  ${(100 * r.repeated).toFixed(1).padStart(5)}%  ${(100 * r.repeated_at_position_0).toFixed(1).padStart(5)}%  ${(100 * r.repeated_after_position_0).toFixed(1).padStart(5)}%`);
}
