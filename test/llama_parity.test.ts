// Parity of the Llama family with PyTorch: test/fixtures/{llama,llama-cls,qwen2} were written by
// scripts/make_llama_fixtures.py (a Llama written in plain torch with HF semantics: RMSNorm,
// rotary with llama3 and linear scaling, grouped-query attention, SwiGLU, Qwen2's q/k/v biases,
// BF16 storage). Logits, loss and every gradient must match to 1e-4 relative.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { openSafetensors } from '../src/io/safetensors.js';
import { Llama } from '../src/model/llama.js';
import { loadLlamaCheckpoint, llamaHFTensors } from '../src/model/llama_checkpoint.js';
import { loadCheckpointTokenizer } from '../src/model/hf_tokenizer.js';
import { availableBackends, setBackend } from '../src/tensor/gemm.js';
import { relErr } from './helpers.js';

const FIX = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../test/fixtures');
const TOL = 1e-4;

for (const backend of availableBackends()) {
  for (const name of ['llama', 'qwen2']) {
    test(`${name} LM: logits, loss and all gradients match PyTorch (${backend})`, async () => {
      setBackend(backend);
      const w = loadLlamaCheckpoint(path.join(FIX, name));
      assert.equal(w.arch, name);
      const m = new Llama(w);
      const ref = openSafetensors(path.join(FIX, name, 'reference.safetensors'));
      const [B, T] = ref.info('tokens').shape;
      const tokens = ref.getInt('tokens'), targets = ref.getInt('targets');
      const e = relErr((await m.forward(tokens, B, T)).logits, ref.get('logits'));
      assert.ok(e < TOL, `logits relative error ${e}`);
      m.ensureGrads();
      m.zeroGrad();
      const { loss } = await m.forward(tokens, B, T, targets);
      const rl = ref.get('loss')[0];
      assert.ok(Math.abs(loss! - rl) / rl < TOL, `loss ${loss} vs ${rl}`);
      await m.backward();
      const gs = llamaHFTensors(m.layout, m.grads!);
      for (const g of gs) {
        const err = relErr(g.data, ref.get(`grad.${g.name}`));
        assert.ok(err < TOL, `gradient of ${g.name}: relative error ${err.toExponential(2)}`);
      }
      assert.equal(gs.length, ref.names().filter((n) => n.startsWith('grad.')).length, 'every reference gradient compared');
    });
  }

  test(`llama sequence classification (last non-pad token) matches PyTorch (${backend})`, async () => {
    setBackend(backend);
    const m = new Llama(loadLlamaCheckpoint(path.join(FIX, 'llama-cls')));
    assert.ok(m.cls && m.padTokenId === 0);
    const ref = openSafetensors(path.join(FIX, 'llama', 'reference.safetensors'));
    const [B, T] = ref.info('cls.tokens').shape;
    const tokens = ref.getInt('cls.tokens'), labels = ref.getInt('cls.labels');
    assert.ok(relErr((await m.forwardCls(tokens, B, T)).logits, ref.get('cls.logits')) < TOL, 'cls logits');
    m.ensureGrads();
    m.zeroGrad();
    const { loss } = await m.forwardCls(tokens, B, T, labels);
    assert.ok(Math.abs(loss! - ref.get('cls.loss')[0]) / ref.get('cls.loss')[0] < TOL);
    await m.backward();
    for (const g of llamaHFTensors(m.layout, m.grads!)) {
      if (g.name === 'lm_head.weight') continue;
      const err = relErr(g.data, ref.get(`cls.grad.${g.name}`));
      assert.ok(err < TOL, `cls gradient of ${g.name}: relative error ${err.toExponential(2)}`);
    }
    assert.ok(relErr(m.clsGrad!, ref.get('cls.grad.score.weight')) < TOL, 'score.weight gradient');
  });
}

test('the fixture tokenizer.json and chat template load through the HF libraries', () => {
  const tok = loadCheckpointTokenizer(path.join(FIX, 'llama'));
  assert.equal(tok.vocabSize, 93);
  assert.equal(tok.eotId, 2);
  assert.equal(tok.bosId, 1);
  const ids = tok.encode('The water is hot');
  assert.deepEqual(ids, [4, 90, 10, 30]);
  assert.equal(tok.decode(ids), 'the water is hot');
  assert.deepEqual(tok.encode('zebra of'), [3, 6], 'unknown words map to <unk>');
  assert.equal(tok.chat([{ role: 'user', content: 'how hot' }]), '<s>user : how hot </s> assistant :');
});
