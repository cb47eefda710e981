import type { GPT2Config } from './config.js';
import type { ParamLayout } from './params.js';
import type { PlainWeights } from './plain_model.js';
import type { Pooling } from './kernels.js';

/** Sequence-classification head (HF `GPT2ForSequenceClassification.score`, no bias). */
export interface ClassifierHead {
  numLabels: number;
  /** `[numLabels, C]` (nn.Linear layout: out x in). */
  weight: Float32Array;
  /** Label names by index (from `id2label`), when known. */
  labels?: string[];
  /**
   * How a row's final states become the classifier's input: `last` (the default; what HF's
   * GPT2ForSequenceClassification does) or `mean` over the row's tokens.
   */
  pooling?: Pooling;
}

/** A GPT-2 model's weights: one contiguous parameter buffer plus an optional classifier. */
export interface GPT2Weights extends PlainWeights<GPT2Config> {
  layout: ParamLayout;
}
