/** A small, dependency-free HTML report builder (tables and inline SVG). */
export function esc(s: unknown): string {
  return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);
}

/** A table; short cells (up to 48 characters) do not wrap. */
export function table(head: string[], rows: (string | number)[][]): string {
  return `<table><thead><tr>${head.map((h) => `<th>${esc(h)}</th>`).join('')}</tr></thead><tbody>${rows.map((r) => `<tr>${r.map((c) => `<td${String(c).length > 48 ? ' class="wrap"' : ''}>${esc(c)}</td>`).join('')}</tr>`).join('')}</tbody></table>`;
}

/** A heading's anchor: lower-case words joined by '-' (e.g. "Training loss (LoRA)" -> "training-loss-lora"). */
export function slug(title: string): string {
  return title.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '');
}

export function page(title: string, sections: { title: string; html: string }[], footer = ''): string {
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${esc(title)}</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;line-height:1.45}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
th{background:#f4f4f4}td{font-variant-numeric:tabular-nums;white-space:nowrap}td.wrap{white-space:normal}.note{color:#555;font-size:.9rem}svg{max-width:100%;height:auto}
</style></head><body>
<h1>${esc(title)}</h1>
${sections.map((s) => `<h2 id="${slug(s.title)}">${esc(s.title)}</h2>\n${s.html}`).join('\n')}
<p class="note">${footer}</p>
</body></html>
`;
}
