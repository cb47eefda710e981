// The report's chart specs (src/report/charts.ts) and the paper report built from them:
// grouped (never stacked) bars within their axis, small multiples with one colour per mode,
// kappa as ordered categories with points, notes on curves that coincide.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import os from 'node:os';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import * as vl from 'vega-lite';
import {
  PALETTE, curveGapNote, groupedBarSpec, lineSpec, maxCurveDiff, ordinalPointSpec, panelLineSpec, renderSvg, type Spec,
} from '../src/report/charts.js';
import { renderReport, rebuildReport, mainTable, type Results, type ResultRow } from '../src/experiments/paper.js';
import { InputError } from '../src/errors.js';

const MODES = ['local', 'sealed', 'paper k=1', 'paper naive'];

/** Every Vega transform of the compiled spec (data pipelines and marks). */
function vegaTransforms(spec: Spec): { type: string }[] {
  const v = vl.compile({ $schema: 'https://vega.github.io/schema/vega-lite/v6.json', ...spec } as vl.TopLevelSpec).spec as unknown as Record<string, unknown>;
  const out: { type: string }[] = [];
  (function walk(x: unknown) {
    if (Array.isArray(x)) x.forEach(walk);
    else if (x && typeof x === 'object') {
      const o = x as Record<string, unknown>;
      if (Array.isArray(o.transform)) out.push(...(o.transform as { type: string }[]));
      Object.values(o).forEach(walk);
    }
  })(v);
  return out;
}

/** The layers of a faceted spec. */
const layers = (s: Spec) => (s.spec as { layer: Spec[] }).layer;
const values = (s: Spec) => (s.data as { values: Record<string, unknown>[] }).values;

test('accuracy bars: grouped by model within each panel, never stacked, on a 0-100% axis', () => {
  const rows = ['base-small', 'base-large'].flatMap((x) => MODES.map((bar, i) => ({ panel: 'food-reviews (lora)', x, bar, value: 60 + i })));
  const s = groupedBarSpec(rows, { title: 'acc', y: '%', bars: MODES, max: 100, refs: [{ panel: 'food-reviews (lora)', value: 65.8, label: 'majority 65.8%' }] });
  const bar = layers(s)[0].encoding as Record<string, Record<string, unknown>>;
  assert.equal(bar.y.stack, null, 'stacking is off');
  assert.deepEqual((bar.y.scale as { domain: number[] }).domain, [0, 100]);
  assert.equal(bar.xOffset.field, 'series', 'bars of one group side by side');
  assert.equal(bar.x.field, 'x');
  assert.ok(!vegaTransforms(s).some((t) => t.type === 'stack'), 'no stack transform in the compiled chart');
  assert.ok(values(s).every((r) => r.kind !== 'bar' || (Number(r.value) >= 0 && Number(r.value) <= 100)));
  assert.ok(values(s).some((r) => r.kind === 'ref' && r.value === 65.8), 'the majority line is drawn');
  // what stacked before: a second model's bar in the same panel, group and mode
  assert.throws(() => groupedBarSpec([...rows, { ...rows[0] }], { title: 'acc', y: '%', bars: MODES, max: 100 }), (e: unknown) => e instanceof InputError && /would stack/.test((e as Error).message));
  assert.throws(() => groupedBarSpec([{ ...rows[0], value: 146 }], { title: 'acc', y: '%', bars: MODES, max: 100 }), /146 is outside \[0, 100\]/);
  assert.throws(() => groupedBarSpec([{ ...rows[0], bar: 'other' }], { title: 'acc', y: '%', bars: MODES, max: 100 }), /not in its legend/);
});

test('loss small multiples: one panel per dataset, one colour per mode from a fixed palette, full legend, notes', () => {
  const rows = ['austen · base-small', 'fortunes · base-small'].flatMap((panel) => MODES.flatMap((series) => [1, 2, 3].map((x) => ({ panel, x, y: 3 - x / 10, series }))));
  const s = panelLineSpec(rows, { title: 'loss', x: 'step', y: 'loss', series: MODES, notes: { 'austen · base-small': 'sealed coincide' } });
  assert.equal((s.facet as { field: string }).field, 'panel');
  const enc = (s.spec as Spec).encoding as Record<string, Record<string, unknown>>;
  const scale = enc.color.scale as { domain: string[]; range: string[] };
  assert.deepEqual(scale.domain, MODES);
  assert.equal(new Set(scale.range).size, MODES.length, 'a colour per mode, none recycled');
  assert.equal((enc.color.legend as { labelLimit: number }).labelLimit, 0, 'legend labels are not cut');
  assert.deepEqual((s.resolve as { scale: { y: string } }).scale.y, 'independent');
  const inner = s.spec as Spec;
  assert.equal((inner.mark as { interpolate: string }).interpolate, 'linear');
  assert.match(String((s.facet as { header: { labelExpr: string } }).header.labelExpr), /"austen · base-small":\["austen · base-small","sealed coincide"\]/, 'the note is under the panel name');
  assert.throws(() => panelLineSpec([{ panel: 'a', x: 1, y: 1, series: 'nine' }], { title: 'loss', x: 'step', y: 'loss', series: MODES }), /not in its legend/);
  const many = Array.from({ length: PALETTE.length + 1 }, (_, i) => ({ x: 1, y: 1, series: `s${i}` }));
  assert.throws(() => lineSpec(many, { title: 'too many', x: 'x', y: 'y' }), (e: unknown) => e instanceof InputError && /distinguishable colours/.test((e as Error).message));
});

test('kappa: ordered categories with points, no line between them', () => {
  const order = ['1', '10', '100', '1000', 'naive'];
  const s = ordinalPointSpec(order.map((x, i) => ({ x, y: 10 ** (i - 6), series: 'paper mode' })), { title: 'fid', x: 'kappa', y: 'err', order, logY: true });
  assert.equal((s.mark as { type: string }).type, 'point');
  const x = (s.encoding as Record<string, Record<string, unknown>>).x;
  assert.equal(x.type, 'ordinal');
  assert.deepEqual(x.sort, order, 'naive comes last, 1000 after 100');
  assert.throws(() => ordinalPointSpec([{ x: '5', y: 1, series: 'a' }], { title: 'fid', x: 'kappa', y: 'err', order }), /not on its axis/);
});

test('curve gaps: coinciding curves are said to coincide, with the largest difference', () => {
  assert.equal(maxCurveDiff([1, 2, 3], [1, 2.5, 3, 9]), 0.5);
  assert.ok(Number.isNaN(maxCurveDiff([], [1])));
  assert.equal(curveGapNote([2, 1.5, 1], [2, 1.5 + 2e-7, 1], 'local vs sealed'), 'local vs sealed: curves coincide: max |diff| = 2.0e-7');
  assert.equal(curveGapNote([2, 1.5, 1], [2, 1.2, 1]), 'max |diff| = 3.0e-1');
});

test('the paper report: before-training column, no stacked bars with two models, an SVG per chart', async () => {
  const row = (model: string, mode: ResultRow['mode'], kappa: string | null, value: number, losses: number[]): ResultRow => ({
    dataset: 'food-reviews', model, method: 'lora', mode, kappa, metric: 'accuracy', value, loss: 1, steps: 3, seconds: 1, losses,
  });
  const rows = ['base-small', 'base-large'].flatMap((m) => [
    row(m, 'local', null, 0.8, [1, 0.8, 0.7]), row(m, 'sealed', '1', 0.8, [1, 0.8 + 1e-7, 0.7]), row(m, 'paper', '1', 0.8, [1, 0.8, 0.7]), row(m, 'paper', 'naive', 0.6, [1, 1.2, 1.1]),
  ]);
  const res: Results = {
    rows, share: [], overhead: [], meta: {},
    fidelity: ['1', '10', 'naive'].map((kappa, i) => ({ kappa, max_abs_logit_err: 10 ** (i - 6), mean_abs_logit_err: 1e-7, top1_agreement: 1, logit_scale: 1, model: 'base-small', mode: 'paper' })),
    baselines: [{ dataset: 'food-reviews', metric: 'accuracy', value: 0.658, kind: 'majority class' }],
    before: [{ dataset: 'food-reviews', model: 'base-small', metric: 'accuracy', value: 0.34, loss: 0.7 }],
  };
  const t = mainTable(res);
  const col = t.head.indexOf('before training');
  assert.ok(col > 0);
  assert.deepEqual(t.rows.map((r) => r[col]), ['34.00%', '-'], 'measured for base-small, not (yet) for base-large');
  assert.match(t.rows[0][t.head.indexOf('baseline')], /65\.80% \(majority class\)/);
  // --report-only: the same report from results.json, nothing run
  const dir = mkdtempSync(path.join(os.tmpdir(), 'obf-report-'));
  try {
    await assert.rejects(rebuildReport(dir), (e: unknown) => e instanceof InputError && /results\.json not found/.test((e as Error).message));
    writeFileSync(path.join(dir, 'results.json'), JSON.stringify(res));
    await rebuildReport(dir);
    assert.match(readFileSync(path.join(dir, 'results.md'), 'utf8'), /\| food-reviews \| base-small \| lora \| accuracy \| 34\.00% \| 80\.00% \|/);
    assert.equal(readFileSync(path.join(dir, 'index.html'), 'utf8'), await renderReport(res));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const html = await renderReport(res);
  assert.equal((html.match(/<svg/g) ?? []).length, 3, 'loss, accuracy and fidelity charts');
  assert.match(html, /sealed, paper k=1 coincide with local: max \|diff\| 1\.0e-7/);
  assert.match(html, /paper naive: max \|diff\| to local 0\.40/);
  assert.match(html, /majority class 65\.8%/);
});

test('a chart renders to SVG', async () => {
  const svg = await renderSvg(lineSpec([{ x: 1, y: 1, series: 'a' }, { x: 2, y: 0.5, series: 'a' }], { title: 't', subtitle: 'curves coincide', x: 'x', y: 'y' }));
  assert.match(svg, /^<svg/);
  assert.match(svg, /curves coincide/);
});
