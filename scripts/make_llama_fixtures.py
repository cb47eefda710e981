#!/usr/bin/python3
"""Generate the PyTorch reference fixtures of the Llama family (no `transformers` needed).

A Llama block written in plain torch with the Hugging Face semantics:

  * nn.Linear weights stored [out, in] (y = x @ W.T + b);
  * RMSNorm in float32: x * rsqrt(mean(x^2) + eps) * weight;
  * rotary embeddings in the `rotate_half` convention (pairs i, i + d_h/2), inverse
    frequencies theta^(-2i/d_h) with `linear` or `llama3` rope_scaling;
  * grouped-query attention (key/value head j serves query heads j*r .. j*r + r-1);
  * SwiGLU MLP down(silu(gate(x)) * up(x)); final RMSNorm; LM head tied or untied;
  * sequence classification: score on the last non-pad token.

Outputs under test/fixtures:

  llama/   LlamaForSequenceClassification-free LlamaForCausalLM checkpoint (F32, GQA 4/2,
           untied head, llama3 rope scaling), tokenizer.json (a tiny WordLevel tokenizer),
           tokenizer_config.json with a chat template, reference.safetensors (LM logits,
           loss, every gradient; classification logits, loss, gradients with score.weight).
  qwen2/   Qwen2ForCausalLM checkpoint stored as BF16 (q/k/v biases, tied head, one key/value
           head, linear rope scaling) and its reference.safetensors.

The references are computed in float32 from the stored (rounded) weights; a float64 rerun
checks them. Run: /usr/bin/python3 scripts/make_llama_fixtures.py
"""

import json
import math
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "test", "fixtures")
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + (
    "the a of to and in is it that was for on are with as his they be at one have this from or had by "
    "hot word but what some we can out other were all there when up use your how said an each she which "
    "do their time if will way about many then them write would like so these her long make thing see "
    "him two has look more day could go come did number sound no most people my over know water than call"
).split()


def to_bytes(t, dtype):
    t = t.detach().contiguous()
    if dtype == "BF16":
        return list(t.shape), t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    if dtype == "I32":
        return list(t.shape), t.to(torch.int32).numpy().astype("<i4").tobytes()
    return list(t.shape), t.to(torch.float32).numpy().astype("<f4").tobytes()


def write_safetensors(path, tensors):
    header, chunks, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t, dtype in tensors:
        shape, raw = to_bytes(t, dtype)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(chunks))


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def inv_freq(cfg):
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    w = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    s = cfg.get("rope_scaling")
    kind = s and s.get("rope_type", s.get("type"))
    if kind == "linear":
        w = w / s["factor"]
    elif kind == "llama3":
        factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / w
        scaled = torch.where(wavelen > old / lo, w / factor, w)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        w = torch.where(medium, smoothed, scaled)
    return w


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def trunk(p, cfg, tokens, dt):
    B, T = tokens.shape
    C, H, KV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps = C // H, cfg["rms_norm_eps"]
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq(cfg)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    lin = lambda x, n: x @ p[n + ".weight"].T + (p[n + ".bias"] if n + ".bias" in p else 0)
    h = p["model.embed_tokens.weight"][tokens]
    mask = torch.full((T, T), float("-inf"), dtype=dt).triu(1)
    for l in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{l}."
        x = rms(h, p[pre + "input_layernorm.weight"], eps)
        q = lin(x, pre + "self_attn.q_proj").view(B, T, H, hd).transpose(1, 2)
        k = lin(x, pre + "self_attn.k_proj").view(B, T, KV, hd).transpose(1, 2)
        v = lin(x, pre + "self_attn.v_proj").view(B, T, KV, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, T, C)
        h = h + lin(o, pre + "self_attn.o_proj")
        x = rms(h, p[pre + "post_attention_layernorm.weight"], eps)
        h = h + lin(F.silu(lin(x, pre + "mlp.gate_proj")) * lin(x, pre + "mlp.up_proj"), pre + "mlp.down_proj")
    return rms(h, p["model.norm.weight"], eps)


def lm(p, cfg, tokens, targets, dt):
    hf = trunk(p, cfg, tokens, dt)
    head = p["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else p["lm_head.weight"]
    logits = hf @ head.T
    return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)


def cls(p, cfg, tokens, labels, pad, dt):
    hf = trunk(p, cfg, tokens, dt)
    last = torch.tensor([max([t for t in range(tokens.shape[1]) if tokens[b, t] != pad] + [0]) for b in range(tokens.shape[0])])
    logits = hf[torch.arange(tokens.shape[0]), last] @ p["score.weight"].T
    return logits, F.cross_entropy(logits, labels)


def params(cfg, gen, bf16, score=0):
    C, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    KV = cfg["num_key_value_heads"] * C // cfg["num_attention_heads"]
    r = lambda *s, std=0.2: torch.randn(*s, generator=gen) * std
    p = {"model.embed_tokens.weight": r(V, C, std=1.0)}
    for l in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{l}."
        p[pre + "input_layernorm.weight"] = 1 + r(C)
        for n, o in (("q", C), ("k", KV), ("v", KV)):
            p[pre + f"self_attn.{n}_proj.weight"] = r(o, C)
            if cfg.get("model_type") == "qwen2":
                p[pre + f"self_attn.{n}_proj.bias"] = r(o)
        p[pre + "self_attn.o_proj.weight"] = r(C, C)
        p[pre + "post_attention_layernorm.weight"] = 1 + r(C)
        p[pre + "mlp.gate_proj.weight"] = r(I, C)
        p[pre + "mlp.up_proj.weight"] = r(I, C)
        p[pre + "mlp.down_proj.weight"] = r(C, I)
    p["model.norm.weight"] = 1 + r(C)
    if not cfg["tie_word_embeddings"]:
        p["lm_head.weight"] = r(V, C)
    if score:
        p["score.weight"] = r(score, C)
    if bf16:  # the reference uses the stored values
        p = {k: v.to(torch.bfloat16).float() for k, v in p.items()}
    return p


def grads(fn, p, dt):
    leaf = {k: v.to(dt).clone().requires_grad_(True) for k, v in p.items()}
    out, loss = fn(leaf)
    loss.backward()
    return out, loss, {k: v.grad for k, v in leaf.items()}


def make(name, cfg, bf16, tokens, targets, cls_case=None, extra_files=None):
    gen = torch.Generator().manual_seed(cfg.pop("seed"))
    nlab = cls_case[1].max().item() + 1 if cls_case else 0
    p = params(cfg, gen, bf16, nlab)
    d = os.path.join(OUT, name)
    dtype = "BF16" if bf16 else "F32"
    write_safetensors(os.path.join(d, "model.safetensors"), [(k, v, dtype) for k, v in p.items() if k != "score.weight"])
    write_json(os.path.join(d, "config.json"), cfg)
    lm_p = {k: v for k, v in p.items() if k != "score.weight"}
    ref = [("tokens", tokens, "I32"), ("targets", targets, "I32")]
    for dt, tag in ((torch.float32, ""), (torch.float64, "64")):
        logits, loss, g = grads(lambda q: lm(q, cfg, tokens, targets, dt), lm_p, dt)
        if dt == torch.float32:
            ref += [("logits", logits, "F32"), ("loss", loss.reshape(1), "F32")] + [(f"grad.{k}", v, "F32") for k, v in g.items()]
            l32, g32 = loss.item(), g
        else:
            worst = max(((g32[k].double() - v).norm() / v.norm()).item() for k, v in g.items())
            print(f"{name}: loss {l32:.6f} (float64 {loss.item():.6f}), worst float32 gradient error {worst:.1e}")
            assert worst < 1e-5 and abs(l32 - loss.item()) < 1e-5 * abs(l32)
    if cls_case:
        toks, labels, pad = cls_case
        logits, loss, g = grads(lambda q: cls(q, cfg, toks, labels, pad, torch.float32), {k: v for k, v in p.items() if k != "lm_head.weight"}, torch.float32)
        ref += [("cls.tokens", toks, "I32"), ("cls.labels", labels, "I32"), ("cls.pad_token_id", torch.tensor([pad]), "I32"),
                ("cls.logits", logits, "F32"), ("cls.loss", loss.reshape(1), "F32")] + [(f"cls.grad.{k}", v, "F32") for k, v in g.items()]
        ccfg = dict(cfg, architectures=["LlamaForSequenceClassification"], num_labels=int(nlab), pad_token_id=pad)
        write_json(os.path.join(OUT, name + "-cls", "config.json"), ccfg)
        write_safetensors(os.path.join(OUT, name + "-cls", "model.safetensors"), [(k, v, dtype) for k, v in p.items() if k != "lm_head.weight"])
    write_safetensors(os.path.join(d, "reference.safetensors"), ref)
    for f, obj in (extra_files or {}).items():
        write_json(os.path.join(d, f), obj)


def word_tokenizer():
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True} for i, w in enumerate(WORDS[:4])],
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(WORDS)}, "unk_token": "<unk>"},
    }


def main():
    g = torch.Generator().manual_seed(7)
    llama = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, vocab_size=len(WORDS), rms_norm_eps=1e-5,
                 rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8}, tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
                 mlp_bias=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32", seed=1)
    B, T = 2, 12
    tokens = torch.randint(4, len(WORDS), (B, T), generator=g)
    targets = torch.randint(0, len(WORDS), (B, T), generator=g)
    targets[1, :3] = -1
    ctoks = torch.randint(4, len(WORDS), (3, 8), generator=g)
    ctoks[0, 5:] = 0
    ctoks[2, 2:] = 0
    tcfg = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"}
    make("llama", llama, False, tokens, targets, (ctoks, torch.tensor([2, 0, 1]), 0),
         {"tokenizer.json": word_tokenizer(), "tokenizer_config.json": tcfg})
    qwen = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32, vocab_size=80, rms_norm_eps=1e-6,
                rope_theta=1000000.0, rope_scaling={"type": "linear", "factor": 2.0}, tie_word_embeddings=True, hidden_act="silu",
                use_sliding_window=False, sliding_window=None, torch_dtype="bfloat16", seed=2)
    qt = torch.randint(0, 80, (2, 10), generator=g)
    make("qwen2", qwen, True, qt, torch.randint(0, 80, (2, 10), generator=g))


if __name__ == "__main__":
    main()
