/** Charts as standalone SVG, from Vega-Lite specifications rendered in Node (no browser). */
import * as vega from 'vega';
import * as vl from 'vega-lite';

export async function renderSvg(spec: Record<string, unknown>): Promise<string> {
  const compiled = vl.compile({ $schema: 'https://vega.github.io/schema/vega-lite/v6.json', ...spec } as vl.TopLevelSpec).spec;
  const view = new vega.View(vega.parse(compiled), { renderer: 'none' });
  const svg = await view.toSVG();
  view.finalize();
  return svg;
}

/** Line chart of y against x, one line per series. */
export function lineChart(rows: { x: number; y: number; series: string }[], o: { title: string; x: string; y: string; logY?: boolean; width?: number; height?: number }): Promise<string> {
  return renderSvg({
    title: o.title, width: o.width ?? 520, height: o.height ?? 260, data: { values: rows }, mark: { type: 'line', interpolate: 'monotone' },
    encoding: {
      x: { field: 'x', type: 'quantitative', title: o.x },
      y: { field: 'y', type: 'quantitative', title: o.y, scale: o.logY ? { type: 'log' } : { type: 'linear', zero: false } },
      color: { field: 'series', type: 'nominal', title: null },
    },
  });
}

/** Grouped bar chart. */
export function barChart(rows: { group: string; bar: string; value: number }[], o: { title: string; y: string; width?: number; height?: number }): Promise<string> {
  return renderSvg({
    title: o.title, width: o.width ?? 120, height: o.height ?? 220, data: { values: rows }, mark: 'bar',
    encoding: {
      column: { field: 'group', type: 'nominal', title: null },
      x: { field: 'bar', type: 'nominal', title: null, axis: { labelAngle: -30 } },
      y: { field: 'value', type: 'quantitative', title: o.y },
      color: { field: 'bar', type: 'nominal', legend: null },
    },
  });
}
