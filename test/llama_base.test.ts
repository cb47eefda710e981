// The bundled Llama-family base model (models/llama-small) and GPT-2's tokenizer.json it ships with.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { LLAMA_PRESETS } from '../src/model/config.js';
import { Llama } from '../src/model/llama.js';
import { gpt2TokenizerFiles, loadCheckpointTokenizer, writeGpt2Tokenizer } from '../src/model/hf_tokenizer.js';
import { gpt2Tokenizer } from '../src/model/tokenizer.js';
import { loadPlainModel } from '../src/cli/model_args.js';
import { corpusFromJsonl } from '../src/train/pretrain.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BASE = path.join(ROOT, 'models/llama-small');
const DATASETS = ['austen', 'food-reviews', 'wordnet-supersense', 'fortunes'];

/** The text of the first `n` records of each bundled dataset's validation split (as pretraining reads them). */
function sampleTexts(n: number): string[] {
  return DATASETS.flatMap((d) => fs.readFileSync(path.join(ROOT, 'data', d, 'validation.jsonl'), 'utf8').split('\n').filter(Boolean).slice(0, n)
    .map((l) => {
      const r = JSON.parse(l) as Record<string, string | undefined>;
      return r.text ?? `${r.prompt ?? ''}${r.completion ?? ''}`;
    }));
}

const EDGE = ['  leading spaces, trailing  ', 'tabs\tand\n\nnewlines \n', "it's they're we'll I'd", 'naïve café 東京 😀 — “quotes”', '12345 3.14159 ,,;;!!'];

test('GPT-2 as tokenizer.json: 50000 merges, and loadCheckpointTokenizer gives the GPT-2 ids on 400 bundled records', () => {
  const { tokenizer, config } = gpt2TokenizerFiles();
  const model = tokenizer.model as { vocab: Record<string, number>; merges: string[] };
  assert.equal(model.merges.length, 50000);
  assert.equal(Object.keys(model.vocab).length, 50257);
  assert.deepEqual(model.merges.slice(0, 3), ['Ġ t', 'Ġ a', 'h e'], "GPT-2's first merges");
  assert.equal(config.eos_token, '<|endoftext|>');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gpt2-tok-'));
  try {
    writeGpt2Tokenizer(dir);
    const tok = loadCheckpointTokenizer(dir);
    assert.deepEqual([tok.vocabSize, tok.eotId], [50257, 50256]);
    const texts = [...sampleTexts(100), ...EDGE];
    let tokens = 0;
    for (const t of texts) {
      const ids = tok.encode(t);
      assert.deepEqual(ids, gpt2Tokenizer.encode(t), JSON.stringify(t).slice(0, 80));
      assert.equal(tok.decode(ids), t);
      tokens += ids.length;
    }
    assert.ok(tokens > 10000, `${tokens} tokens compared`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the bundled llama-small: a LlamaForCausalLM directory with GPT-2 ids, finite logits, validation loss below the unigram baseline', async () => {
  const cfg = JSON.parse(fs.readFileSync(path.join(BASE, 'config.json'), 'utf8'));
  assert.deepEqual(cfg.architectures, ['LlamaForCausalLM']);
  assert.deepEqual(
    [cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings, cfg.torch_dtype],
    ['llama', 4, 4, 2, 128, 344, 50257, true, 'float16'],
  );
  const plain = loadPlainModel(BASE);
  assert.ok(plain.model instanceof Llama);
  assert.deepEqual(plain.model.config, LLAMA_PRESETS['llama-small']);
  const tok = plain.tokenizer();
  assert.notEqual(tok, gpt2Tokenizer, 'the checkpoint\'s own tokenizer.json');
  for (const t of [...sampleTexts(5), ...EDGE]) assert.deepEqual(tok.encode(t), gpt2Tokenizer.encode(t));
  const info = JSON.parse(fs.readFileSync(path.join(BASE, 'pretraining.json'), 'utf8'));
  const valid = corpusFromJsonl([path.join(ROOT, 'data/austen/validation.jsonl')], tok, true).stream;
  const [B, T] = [4, 128];
  const tokens = new Int32Array(B * T), targets = new Int32Array(B * T);
  for (let b = 0; b < B; b++) {
    const s = b * 1000;
    tokens.set(valid.subarray(s, s + T), b * T);
    targets.set(valid.subarray(s + 1, s + T + 1), b * T);
  }
  const r = await plain.model.forward(tokens, B, T, targets, false);
  assert.equal(r.logits.length, B * T * 50257);
  assert.ok(r.logits.every(Number.isFinite), 'finite logits');
  assert.ok(r.loss! < info.unigram_valid_loss - 0.5, `loss ${r.loss} vs unigram ${info.unigram_valid_loss}`);
  assert.ok(Math.abs(r.loss! - info.valid_loss) < 0.5, `loss ${r.loss} near the recorded validation loss ${info.valid_loss}`);
});
