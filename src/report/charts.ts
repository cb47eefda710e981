/**
 * Charts as standalone SVG, from Vega-Lite specifications rendered in Node (no browser). The
 * spec builders (`*Spec`) are pure and checked by tests; they refuse data that would make a
 * chart lie: bars that would stack, percentages outside their axis, more series than
 * distinguishable colours.
 */
import * as vega from 'vega';
import * as vl from 'vega-lite';
import { InputError } from '../errors.js';

export type Spec = Record<string, unknown>;

/** Distinguishable colours (Tableau 10's first eight); a chart with more series is refused. */
export const PALETTE = ['#4c78a8', '#f58518', '#54a24b', '#e45756', '#72b7b2', '#b279a2', '#eeca3b', '#9d755d'];

export async function renderSvg(spec: Spec): Promise<string> {
  const compiled = vl.compile({ $schema: 'https://vega.github.io/schema/vega-lite/v6.json', ...spec } as vl.TopLevelSpec).spec;
  const view = new vega.View(vega.parse(compiled), { renderer: 'none' });
  const svg = await view.toSVG();
  view.finalize();
  return svg;
}

/** max |a[i] - b[i]| over the steps both curves have (NaN if they share none). */
export function maxCurveDiff(a: number[], b: number[]): number {
  const n = Math.min(a.length, b.length);
  let m = n ? 0 : NaN;
  for (let i = 0; i < n; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/** The largest gap between two curves, and whether it is invisible at their chart's scale (at most 0.5% of the range they span). */
export function curveGap(a: number[], b: number[]): { diff: number; coincide: boolean } {
  const diff = maxCurveDiff(a, b);
  const all = [...a, ...b].filter(Number.isFinite);
  const range = all.length ? Math.max(...all) - Math.min(...all) : 0;
  return { diff, coincide: diff <= 0.005 * Math.max(range, 1e-12) };
}

/** "curves coincide: max |diff| = 2.4e-7" when the curves coincide (curveGap), else "max |diff| = ...". */
export function curveGapNote(a: number[], b: number[], what = ''): string {
  const { diff, coincide } = curveGap(a, b);
  return `${what ? `${what}: ` : ''}${coincide ? 'curves coincide: ' : ''}max |diff| = ${diff.toExponential(1)}`;
}

/** A colour scale over a fixed list of series (order kept), refusing more than PALETTE has. */
function colours(series: string[], title: string | null = null): Spec {
  if (series.length > PALETTE.length) throw new InputError(`a chart with ${series.length} series (${series.join(', ')}) has more than ${PALETTE.length} distinguishable colours; split it into panels`);
  return { field: 'series', type: 'nominal', title, scale: { domain: series, range: PALETTE.slice(0, series.length) }, legend: { orient: 'bottom', labelLimit: 0, columns: Math.min(series.length, 4) } };
}

const uniq = (xs: string[]) => [...new Set(xs)];

/** The first series solid, the others dashed (curves that coincide stay visible); one legend with the colours. */
function dashes(series: string[]): Spec {
  return { field: 'series', type: 'nominal', title: null, scale: { domain: series, range: series.map((_, i) => (i === 0 ? [1, 0] : [6, 2 + 2 * i])) } };
}

export interface LineRow { x: number; y: number; series: string }

/** One panel of lines (straight segments between measured points), one colour per series, all but the first dashed. */
export function lineSpec(rows: LineRow[], o: { title: string; x: string; y: string; subtitle?: string; logY?: boolean; width?: number; height?: number }): Spec {
  return {
    title: o.subtitle ? { text: o.title, subtitle: o.subtitle } : o.title, width: o.width ?? 520, height: o.height ?? 260, data: { values: rows },
    mark: { type: 'line', interpolate: 'linear' },
    encoding: {
      x: { field: 'x', type: 'quantitative', title: o.x },
      y: { field: 'y', type: 'quantitative', title: o.y, scale: o.logY ? { type: 'log' } : { type: 'linear', zero: false } },
      color: colours(uniq(rows.map((r) => r.series))), strokeDash: dashes(uniq(rows.map((r) => r.series))),
    },
  };
}

export interface PanelLineRow extends LineRow { panel: string }

/**
 * Small multiples: one panel per `panel` value (own y scale), the same colour per series in
 * every panel (later series dashed, so coinciding curves stay visible), and a note per panel
 * under its name (e.g. the largest gap between curves that coincide; lines split at '\n').
 */
export function panelLineSpec(rows: PanelLineRow[], o: { title: string; x: string; y: string; series: string[]; notes?: Record<string, string>; columns?: number; width?: number; height?: number }): Spec {
  for (const r of rows) if (!o.series.includes(r.series)) throw new InputError(`chart "${o.title}": series "${r.series}" is not in its legend (${o.series.join(', ')})`);
  const labels = Object.fromEntries(Object.entries(o.notes ?? {}).map(([panel, note]) => [panel, [panel, ...note.split('\n')]]));
  return {
    title: o.title, data: { values: rows },
    facet: {
      field: 'panel', type: 'nominal', title: null, sort: uniq(rows.map((r) => r.panel)),
      header: { labelFontSize: 11, labelExpr: `(${JSON.stringify(labels)})[datum.value] || datum.value`, labelLimit: 0 },
    },
    columns: o.columns ?? 2,
    resolve: { scale: { x: 'independent', y: 'independent' } },
    spec: {
      width: o.width ?? 480, height: o.height ?? 150, mark: { type: 'line', interpolate: 'linear', strokeWidth: 1.2 },
      encoding: {
        x: { field: 'x', type: 'quantitative', title: o.x },
        y: { field: 'y', type: 'quantitative', title: o.y, scale: { zero: false } },
        color: colours(o.series), strokeDash: dashes(o.series),
      },
    },
  };
}

export interface BarRow { panel: string; x: string; bar: string; value: number }

/**
 * Grouped bars: a panel per `panel` value, a group per `x` value inside it (in the rows'
 * order), a bar per `bar` value inside each group (side by side, never stacked), optional
 * dashed reference lines per panel (e.g. the majority class), labelled in the panel's top
 * left corner. A second bar for the same panel, group and bar would stack
 * and is refused, as is a value outside [0, max].
 */
export function groupedBarSpec(rows: BarRow[], o: { title: string; y: string; bars: string[]; max?: number; refs?: { panel: string; value: number; label: string }[]; columns?: number; width?: number; height?: number }): Spec {
  const seen = new Set<string>();
  for (const r of rows) {
    const k = `${r.panel} | ${r.x} | ${r.bar}`;
    if (seen.has(k)) throw new InputError(`chart "${o.title}": two values for ${k} would stack`);
    seen.add(k);
    if (!o.bars.includes(r.bar)) throw new InputError(`chart "${o.title}": bar "${r.bar}" is not in its legend (${o.bars.join(', ')})`);
    if (o.max !== undefined && !(r.value >= 0 && r.value <= o.max)) throw new InputError(`chart "${o.title}": ${k} = ${r.value} is outside [0, ${o.max}]`);
  }
  const scale = o.max !== undefined ? { domain: [0, o.max] } : {};
  const refs = (o.refs ?? []).map((r) => ({ ...r, kind: 'ref', series: null }));
  return {
    title: o.title, data: { values: [...rows.map((r) => ({ ...r, series: r.bar, kind: 'bar' })), ...refs] },
    facet: { field: 'panel', type: 'nominal', title: null, sort: uniq(rows.map((r) => r.panel)), header: { labelFontSize: 12, labelFontWeight: 'bold' } },
    columns: o.columns ?? 3,
    spec: {
      width: o.width ?? 200, height: o.height ?? 200,
      layer: [
        {
          transform: [{ filter: "datum.kind === 'bar'" }], mark: 'bar',
          encoding: {
            x: { field: 'x', type: 'nominal', title: null, sort: uniq(rows.map((r) => r.x)), axis: { labelAngle: 0 } },
            xOffset: { field: 'series', type: 'nominal', scale: { domain: o.bars } },
            y: { field: 'value', type: 'quantitative', title: o.y, stack: null, scale },
            color: colours(o.bars),
            tooltip: [{ field: 'x' }, { field: 'series' }, { field: 'value', format: '.2f' }],
          },
        },
        {
          transform: [{ filter: "datum.kind === 'ref'" }], mark: { type: 'rule', strokeDash: [4, 3], color: '#555' },
          encoding: { y: { field: 'value', type: 'quantitative', scale } },
        },
        {
          transform: [{ filter: "datum.kind === 'ref'" }], mark: { type: 'text', align: 'left', baseline: 'top', fontSize: 10, color: '#333' },
          encoding: { x: { value: 4 }, y: { value: 3 }, text: { field: 'label' } },
        },
      ],
    },
  };
}

export interface PointRow { x: string; y: number; series: string }

/** Points over an ordinal x axis whose categories keep the given order (no line: the categories have no values in between). */
export function ordinalPointSpec(rows: PointRow[], o: { title: string; x: string; y: string; order: string[]; logY?: boolean; width?: number; height?: number }): Spec {
  for (const r of rows) if (!o.order.includes(r.x)) throw new InputError(`chart "${o.title}": category "${r.x}" is not on its axis (${o.order.join(', ')})`);
  return {
    title: o.title, width: o.width ?? 360, height: o.height ?? 240, data: { values: rows },
    mark: { type: 'point', filled: true, size: 80 },
    encoding: {
      x: { field: 'x', type: 'ordinal', title: o.x, sort: o.order, axis: { labelAngle: 0 } },
      y: { field: 'y', type: 'quantitative', title: o.y, scale: o.logY ? { type: 'log' } : { zero: false } },
      color: colours(uniq(rows.map((r) => r.series))),
      shape: { field: 'series', type: 'nominal', title: null },
      tooltip: [{ field: 'series' }, { field: 'x' }, { field: 'y', format: '.2e' }],
    },
  };
}
