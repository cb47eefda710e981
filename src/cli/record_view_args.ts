/** The `--record-view` flags of the commands that can record the accelerator's view. */
import type { Command } from 'commander';
import type { RecorderOptions } from '../protocol/view.js';
import { InputError } from '../errors.js';
import { numberList } from './model_args.js';

export function addRecordViewOptions(c: Command): Command {
  return c
    .option('--record-view <file>', 'save every tensor that crosses to and from the accelerator, and the accelerator bundle, to FILE (the adversary\'s view; its scoring key goes to FILE.truth.json)')
    .option('--record-view-layers <list>', 'with --record-view: only these layers (comma-separated)')
    .option('--record-view-max-mb <n>', 'with --record-view: stop recording tensors beyond this size (default 2048)');
}

/** The recorder's options, or null without --record-view (its sub-flags alone are refused). */
export function recorderOptionsOf(o: { recordView?: string; recordViewLayers?: string; recordViewMaxMb?: string }): RecorderOptions | null {
  if (!o.recordView) {
    if (o.recordViewLayers !== undefined || o.recordViewMaxMb !== undefined) throw new InputError('--record-view-layers and --record-view-max-mb need --record-view FILE');
    return null;
  }
  const out: RecorderOptions = {};
  if (o.recordViewLayers !== undefined) {
    out.layers = numberList(o.recordViewLayers, '--record-view-layers', 'a layer index', (n) => Number.isInteger(n) && n >= 0);
  }
  if (o.recordViewMaxMb !== undefined) {
    const mb = Number(o.recordViewMaxMb);
    if (!(mb > 0)) throw new InputError(`--record-view-max-mb: "${o.recordViewMaxMb}" is not a positive number`);
    out.maxBytes = Math.floor(mb * 2 ** 20);
  }
  return out;
}
