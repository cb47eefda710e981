#!/usr/bin/python3
"""Generate the PyTorch reference fixtures used by the TypeScript GPT-2 tests.

The GPT-2 model is defined here in plain torch with exactly the Hugging Face
GPT-2 semantics (no `transformers` dependency):

  * Conv1D weights stored `in x out` (y = x @ W + b);
  * fused c_attn: q, k, v split along the output dim in that order, heads split
    contiguously (head i uses columns i*dh:(i+1)*dh of each of q/k/v);
  * causal softmax attention scaled by 1/sqrt(dh);
  * GELU tanh approximation ("gelu_new");
  * LayerNorm eps 1e-5, pre-norm blocks, final ln_f;
  * LM head tied to wte (logits = h @ wte^T), no dropout.

Everything is computed in float32 on the CPU with one thread and deterministic
algorithms, so every output file is byte-for-byte reproducible. Safetensors
files are written by hand (no `safetensors` package needed).

Outputs (relative to the repository root):

  test/fixtures/tiny/         GPT2LMHeadModel checkpoint (F32, `transformer.`
                              prefix, legacy attn.bias/masked_bias buffers,
                              lm_head.weight) + reference.safetensors with LM
                              and sequence-classification references.
  test/fixtures/tiny-cls/     GPT2ForSequenceClassification checkpoint (F32).
  test/fixtures/vocab50257/   1-layer, n_embd=4 model with the real GPT-2
                              vocabulary size, stored as F16 without prefix.
  test/fixtures/README.md     description of the files.

As a self-check (nothing of it is written to disk) the script recomputes every
loss and gradient in float64, compares them with the float32 results, and
probes a few gradient entries with central finite differences in float64.

Run from anywhere (needs Debian's torch: `apt-get install python3-torch
python3-numpy`):

    /usr/bin/python3 scripts/make_fixtures.py
"""

import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "test", "fixtures")

SEED = 1337
EPS = 1e-5

TINY = dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=512)
BIG_VOCAB = dict(n_layer=1, n_head=2, n_embd=4, n_positions=16, vocab_size=50257)

torch.set_default_dtype(torch.float32)
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------
# safetensors writer
# --------------------------------------------------------------------------

_NP_DTYPE = {"F32": "<f4", "F16": "<f2", "I32": "<i4", "F64": "<f8"}


def _to_bytes(t, dtype):
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if dtype == "F16":
            t = t.to(torch.float16)
        elif dtype == "F32":
            t = t.to(torch.float32)
        elif dtype == "I32":
            t = t.to(torch.int32)
        a = t.numpy()
    else:
        a = np.asarray(t)
    a = np.ascontiguousarray(a.astype(_NP_DTYPE[dtype]))
    return list(a.shape), a.tobytes()


def write_safetensors(path, tensors, metadata=None):
    """tensors: list of (name, tensor, dtype) in file order."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    chunks = []
    offset = 0
    for name, t, dtype in tensors:
        assert name not in header, name
        shape, raw = _to_bytes(t, dtype)
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((-len(hjson)) % 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for c in chunks:
            f.write(c)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------

LAYER_PARAMS = [
    "ln_1.weight", "ln_1.bias",
    "attn.c_attn.weight", "attn.c_attn.bias",
    "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias",
]


def param_names(cfg):
    names = ["wte.weight", "wpe.weight"]
    for i in range(cfg["n_layer"]):
        names += [f"h.{i}.{p}" for p in LAYER_PARAMS]
    names += ["ln_f.weight", "ln_f.bias"]
    return names


def init_params(cfg, gen):
    """GPT-2 style init; biases and LN params get small random values too."""
    C, V, P, L = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"]
    proj_std = 0.02 / math.sqrt(2 * L)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    p = {}
    for name in param_names(cfg):
        leaf = name.split(".", 2)[-1] if name.startswith("h.") else name
        if name == "wte.weight":
            t = 0.02 * randn(V, C)
        elif name == "wpe.weight":
            t = 0.02 * randn(P, C)
        elif leaf.startswith("ln_") and leaf.endswith(".weight"):
            t = 1.0 + 0.1 * randn(C)
        elif leaf.startswith("ln_") and leaf.endswith(".bias"):
            t = 0.1 * randn(C)
        elif leaf == "attn.c_attn.weight":
            t = 0.02 * randn(C, 3 * C)
        elif leaf == "attn.c_attn.bias":
            t = 0.02 * randn(3 * C)
        elif leaf == "attn.c_proj.weight":
            t = proj_std * randn(C, C)
        elif leaf == "attn.c_proj.bias":
            t = 0.02 * randn(C)
        elif leaf == "mlp.c_fc.weight":
            t = 0.02 * randn(C, 4 * C)
        elif leaf == "mlp.c_fc.bias":
            t = 0.02 * randn(4 * C)
        elif leaf == "mlp.c_proj.weight":
            t = proj_std * randn(4 * C, C)
        elif leaf == "mlp.c_proj.bias":
            t = 0.02 * randn(C)
        else:
            raise KeyError(name)
        p[name] = t.contiguous()
    return p


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def transformer(p, cfg, tokens):
    """Returns the hidden state after ln_f, shape [B, T, C]."""
    B, T = tokens.shape
    C, H = cfg["n_embd"], cfg["n_head"]
    dh = C // H
    pos = torch.arange(T)
    x = p["wte.weight"][tokens] + p["wpe.weight"][pos][None]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(cfg["n_layer"]):
        g = lambda n: p[f"h.{i}.{n}"]  # noqa: E731
        a = F.layer_norm(x, (C,), g("ln_1.weight"), g("ln_1.bias"), EPS)
        qkv = a @ g("attn.c_attn.weight") + g("attn.c_attn.bias")
        q, k, v = qkv.split(C, dim=-1)
        q = q.view(B, T, H, dh).transpose(1, 2)
        k = k.view(B, T, H, dh).transpose(1, 2)
        v = v.view(B, T, H, dh).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(dh)
        att = att.masked_fill(~causal, float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + (y @ g("attn.c_proj.weight") + g("attn.c_proj.bias"))
        m = F.layer_norm(x, (C,), g("ln_2.weight"), g("ln_2.bias"), EPS)
        m = gelu_new(m @ g("mlp.c_fc.weight") + g("mlp.c_fc.bias"))
        x = x + (m @ g("mlp.c_proj.weight") + g("mlp.c_proj.bias"))
    return F.layer_norm(x, (C,), p["ln_f.weight"], p["ln_f.bias"], EPS)


def lm_forward(p, cfg, tokens, targets):
    h = transformer(p, cfg, tokens)
    logits = h @ p["wte.weight"].t()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-1, reduction="mean")
    return logits, loss


def last_non_pad(tokens, pad):
    T = tokens.shape[1]
    idx = torch.arange(T)[None].expand_as(tokens)
    return torch.where(tokens != pad, idx, torch.full_like(idx, -1)).max(dim=1).values


def cls_forward(p, cfg, tokens, pad, labels):
    h = transformer(p, cfg, tokens)
    last = last_non_pad(tokens, pad)
    pooled = h[torch.arange(tokens.shape[0]), last]
    logits = pooled @ p["score.weight"].t()
    loss = F.cross_entropy(logits, labels, reduction="mean")
    return logits, loss


# --------------------------------------------------------------------------
# autograd + self-checks
# --------------------------------------------------------------------------

def leafs(p, dtype):
    return {k: v.detach().to(dtype).clone().requires_grad_(True) for k, v in p.items()}


def run_with_grads(fn, p, dtype):
    q = leafs(p, dtype)
    out, loss = fn(q)
    grads = torch.autograd.grad(loss, [q[k] for k in q])
    return out.detach(), loss.detach(), {k: g.detach() for k, g in zip(q, grads)}


def self_check(label, fn, p, out32, loss32, g32, probes):
    """Float64 recomputation + finite-difference probes. Returns worst rel. errors."""
    out64, loss64, g64 = run_with_grads(fn, p, torch.float64)
    assert torch.isfinite(loss32) and torch.isfinite(loss64), label
    worst_g, worst_k = 0.0, None
    for k in g64:
        ref = g64[k]
        err = (g32[k].double() - ref).norm().item() / max(ref.norm().item(), 1e-30)
        if err > worst_g:
            worst_g, worst_k = err, k
    err_out = (out32.double() - out64).norm().item() / out64.norm().item()
    err_loss = abs(loss32.item() - loss64.item()) / abs(loss64.item())
    assert worst_g < 1e-4 and err_out < 1e-5 and err_loss < 1e-5, (label, worst_g, err_out, err_loss)

    h = 1e-5
    for name, index in probes:
        q = {k: v.detach().double().clone() for k, v in p.items()}
        base = q[name][index].item()
        with torch.no_grad():
            q[name][index] = base + h
            lp = fn(q)[1].item()
            q[name][index] = base - h
            lm = fn(q)[1].item()
        fd = (lp - lm) / (2 * h)
        an = g64[name][index].item()
        assert abs(fd - an) <= 1e-7 + 1e-5 * abs(an), (label, name, index, fd, an)
        print(f"  [{label}] fd probe {name}{list(index)}: autograd={an:+.9e} fd={fd:+.9e}")
    print(f"  [{label}] f32 vs f64: loss {err_loss:.1e}, outputs {err_out:.1e}, "
          f"worst grad (norm-relative) {worst_g:.1e} ({worst_k})")
    return worst_g


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

def hf_config(cfg, **extra):
    c = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": cfg["n_layer"],
        "n_head": cfg["n_head"],
        "n_embd": cfg["n_embd"],
        "n_positions": cfg["n_positions"],
        "n_ctx": cfg["n_positions"],
        "vocab_size": cfg["vocab_size"],
        "layer_norm_epsilon": EPS,
        "activation_function": "gelu_new",
        "bos_token_id": cfg["vocab_size"] - 1,
        "eos_token_id": cfg["vocab_size"] - 1,
        "torch_dtype": "float32",
    }
    c.update(extra)
    return c


def make_tiny():
    cfg = TINY
    V, C, P = cfg["vocab_size"], cfg["n_embd"], cfg["n_positions"]
    gen = torch.Generator().manual_seed(SEED)
    p = init_params(cfg, gen)
    names = param_names(cfg)

    # ---- LM task ----
    B, T = 2, 16
    tokens = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    for b, t in [(0, 3), (0, 15), (1, 0), (1, 7)]:
        targets[b, t] = -1

    lm = lambda q: lm_forward(q, cfg, tokens, targets)  # noqa: E731
    logits, loss, grads = run_with_grads(lm, p, torch.float32)
    wg_lm = self_check("tiny lm", lm, p, logits, loss, grads, [
        ("h.0.attn.c_attn.weight", (5, 17)),
        ("h.1.attn.c_attn.weight", (9, 2 * C + 13)),
        ("h.0.ln_1.weight", (11,)),
        ("wte.weight", (int(tokens[0, 4]), 7)),
        ("wpe.weight", (6, 3)),
    ])

    # ---- sequence classification task ----
    pad = 0
    n_labels = 3
    score = 0.02 * torch.randn(n_labels, C, generator=gen)
    lengths = [16, 9, 1]
    ctoks = torch.randint(1, V, (len(lengths), T), generator=gen)
    for r, n in enumerate(lengths):
        ctoks[r, n:] = pad
    labels = torch.tensor([2, 0, 1])
    assert last_non_pad(ctoks, pad).tolist() == [n - 1 for n in lengths]

    pc = dict(p)
    pc["score.weight"] = score.contiguous()
    cl = lambda q: cls_forward(q, cfg, ctoks, pad, labels)  # noqa: E731
    clogits, closs, cgrads = run_with_grads(cl, pc, torch.float32)
    wg_cls = self_check("tiny cls", cl, pc, clogits, closs, cgrads, [
        ("score.weight", (1, 10)),
        ("h.1.mlp.c_fc.weight", (3, 100)),
        ("h.0.attn.c_attn.bias", (5,)),
    ])

    # ---- tiny/ (GPT2LMHeadModel, prefixed, legacy buffers, lm_head) ----
    d = os.path.join(OUT, "tiny")
    write_json(os.path.join(d, "config.json"), hf_config(cfg))
    ts = []
    tril = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
    for n in names:
        ts.append(("transformer." + n, p[n], "F32"))
        if n.endswith("attn.c_proj.bias"):
            layer = n.split(".")[1]
            ts.append((f"transformer.h.{layer}.attn.bias", tril, "F32"))
            ts.append((f"transformer.h.{layer}.attn.masked_bias", torch.tensor(-1e4), "F32"))
    ts.append(("lm_head.weight", p["wte.weight"].clone(), "F32"))
    write_safetensors(os.path.join(d, "model.safetensors"), ts, {"format": "pt"})

    ref = [
        ("tokens", tokens, "I32"),
        ("targets", targets, "I32"),
        ("logits", logits, "F32"),
        ("loss", loss.reshape(1), "F32"),
    ]
    ref += [("grad." + n, grads[n], "F32") for n in names]
    ref += [
        ("cls.tokens", ctoks, "I32"),
        ("cls.pad_token_id", torch.tensor([pad]), "I32"),
        ("cls.labels", labels, "I32"),
        ("cls.logits", clogits, "F32"),
        ("cls.loss", closs.reshape(1), "F32"),
    ]
    ref += [("cls.grad." + n, cgrads[n], "F32") for n in names]
    ref.append(("cls.grad.score.weight", cgrads["score.weight"], "F32"))
    write_safetensors(os.path.join(d, "reference.safetensors"), ref,
                      {"seed": SEED, "ignore_index": -1, "torch": torch.__version__})

    # ---- tiny-cls/ (GPT2ForSequenceClassification) ----
    d = os.path.join(OUT, "tiny-cls")
    write_json(os.path.join(d, "config.json"), hf_config(
        cfg,
        architectures=["GPT2ForSequenceClassification"],
        num_labels=n_labels,
        pad_token_id=pad,
        id2label={"0": "a", "1": "b", "2": "c"},
        label2id={"a": 0, "b": 1, "c": 2},
    ))
    ts = [("transformer." + n, p[n], "F32") for n in names]
    ts.append(("score.weight", score, "F32"))
    write_safetensors(os.path.join(d, "model.safetensors"), ts, {"format": "pt"})

    return dict(lm_loss=loss.item(), cls_loss=closs.item(), wg=max(wg_lm, wg_cls))


def make_vocab50257():
    cfg = BIG_VOCAB
    V, P = cfg["vocab_size"], cfg["n_positions"]
    gen = torch.Generator().manual_seed(SEED + 1)
    p = init_params(cfg, gen)
    # Round to float16 first: the stored F16 checkpoint is exactly the model used.
    p = {k: v.half().float() for k, v in p.items()}
    names = param_names(cfg)

    T = 8
    tokens = torch.randint(0, V, (1, T), generator=gen)
    targets = torch.randint(0, V, (1, T), generator=gen)
    tokens[0, 2] = 50256
    tokens[0, 5] = int(torch.randint(50001, 50256, (1,), generator=gen))
    targets[0, 1] = int(torch.randint(50001, 50256, (1,), generator=gen))
    targets[0, 7] = 50256

    lm = lambda q: lm_forward(q, cfg, tokens, targets)  # noqa: E731
    logits, loss, grads = run_with_grads(lm, p, torch.float32)
    wg = self_check("vocab50257", lm, p, logits, loss, grads, [
        ("wte.weight", (int(tokens[0, 5]), 1)),
        ("wte.weight", (int(targets[0, 7]), 2)),
        ("h.0.attn.c_attn.weight", (2, 9)),
    ])

    used = set(tokens.flatten().tolist()) | set(targets.flatten().tolist())
    others = [i for i in torch.randperm(V, generator=gen).tolist() if i not in used][:32]
    rows = torch.tensor(sorted(used | set(others)), dtype=torch.int64)
    gw = grads["wte.weight"]

    d = os.path.join(OUT, "vocab50257")
    write_json(os.path.join(d, "config.json"), hf_config(cfg, torch_dtype="float16"))
    ts = []
    tril = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
    for n in names:
        ts.append((n, p[n], "F16"))
        if n == "h.0.attn.c_proj.bias":
            ts.append(("h.0.attn.bias", tril, "F16"))
    write_safetensors(os.path.join(d, "model.safetensors"), ts, {"format": "pt"})

    ref = [
        ("tokens", tokens, "I32"),
        ("targets", targets, "I32"),
        ("logits_last", logits[0, -1], "F32"),
        ("logits_rowsum", logits.double().sum(dim=-1), "F32"),
        ("loss", loss.reshape(1), "F32"),
        ("grad.wte.weight.rows", rows, "I32"),
        ("grad.wte.weight", gw[rows], "F32"),
        ("grad.wte.weight.norm", gw.double().norm().reshape(1), "F32"),
    ]
    ref += [("grad." + n, grads[n], "F32") for n in names if n != "wte.weight"]
    write_safetensors(os.path.join(d, "reference.safetensors"), ref,
                      {"seed": SEED + 1, "torch": torch.__version__})
    return dict(loss=loss.item(), rows=len(rows), wg=wg)


README = """# Reference fixtures

Generated by `scripts/make_fixtures.py` with PyTorch {torch} (float32, CPU,
one thread, deterministic algorithms). Every file is byte-for-byte
reproducible. Regenerate with:

    apt-get install -y python3-torch python3-numpy
    /usr/bin/python3 scripts/make_fixtures.py

The model is defined in plain torch with Hugging Face GPT-2 semantics:
Conv1D weights `in x out`, fused `c_attn` (q, k, v along the output dim,
heads contiguous), causal attention scaled by 1/sqrt(dh), `gelu_new`,
LayerNorm eps 1e-5, pre-norm blocks, final `ln_f`, LM head tied to `wte`,
no dropout. Init: seed {seed} (tiny) / {seed1} (vocab50257); weights
normal(0, 0.02), `c_proj` weights normal(0, 0.02/sqrt(2*n_layer)), biases
0.02*randn, LayerNorm weight 1+0.1*randn, bias 0.1*randn.

## tiny/

n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=512.

- `config.json`: HF `GPT2LMHeadModel` config.
- `model.safetensors` (F32): parameters named with the `transformer.` prefix,
  plus the legacy buffers `transformer.h.N.attn.bias` ([1,1,64,64] lower
  triangular ones) and `transformer.h.N.attn.masked_bias` (scalar -1e4), plus
  `lm_head.weight` (a copy of `wte`).
- `reference.safetensors`:
  - LM task: `tokens` I32 [2,16], `targets` I32 [2,16] (random ids; -1 means
    ignored), `logits` F32 [2,16,512], `loss` F32 [1] (mean cross-entropy over
    the non-ignored targets), `grad.<name>` F32 for every parameter (names
    without prefix; `grad.wte.weight` includes the embedding and the tied head
    contributions).
  - Sequence classification (GPT2ForSequenceClassification, num_labels=3,
    `score.weight` from `tiny-cls/`): `cls.tokens` I32 [3,16] right-padded
    with pad id 0 (real tokens are 1..511, real lengths 16, 9, 1),
    `cls.pad_token_id` I32 [1], `cls.labels` I32 [3], `cls.logits` F32 [3,3]
    (score applied to the ln_f output at the last position whose token is not
    the pad id), `cls.loss` F32 [1] (mean cross-entropy), `cls.grad.<name>` for
    every transformer parameter and `cls.grad.score.weight`. No attention mask:
    padding comes after the pooled token, so causality hides it.

## tiny-cls/

Same transformer weights as `tiny/`. `config.json` is a
`GPT2ForSequenceClassification` config (num_labels 3, pad_token_id 0,
labels a/b/c); `model.safetensors` (F32) holds the `transformer.`-prefixed
parameters and `score.weight` [3,32] (out x in, no bias); no `lm_head`, no
attention buffers.

## vocab50257/

n_layer=1, n_head=2, n_embd=4, n_positions=16, vocab_size=50257. Parameters
were rounded to float16 first; the references are computed in float32 from
exactly those values.

- `config.json`: HF `GPT2LMHeadModel` config, torch_dtype float16.
- `model.safetensors` (F16): names without prefix, plus the legacy buffer
  `h.0.attn.bias` ([1,1,16,16] F16); no `lm_head.weight`.
- `reference.safetensors`: `tokens` I32 [1,8], `targets` I32 [1,8] (no ignored
  entries; ids above 50000 included), `logits_last` F32 [50257] (logits of
  the last position), `logits_rowsum` F32 [1,8] (sum over the vocabulary of
  the float32 logits, accumulated in float64), `loss` F32 [1],
  `grad.<name>` for every parameter except `wte`; for `wte`:
  `grad.wte.weight.rows` I32 [k] (sorted: input ids, target ids and 32 other
  random ids), `grad.wte.weight` F32 [k,4] (those rows of the full gradient)
  and `grad.wte.weight.norm` F32 [1] (Frobenius norm of the full gradient).
"""


def main():
    print(f"torch {torch.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}")
    tiny = make_tiny()
    big = make_vocab50257()
    with open(os.path.join(OUT, "README.md"), "w", encoding="utf-8") as f:
        f.write(README.format(torch=torch.__version__, seed=SEED, seed1=SEED + 1))

    total = 0
    print("written:")
    for dirpath, _, files in sorted(os.walk(OUT)):
        for fn in sorted(files):
            path = os.path.join(dirpath, fn)
            size = os.path.getsize(path)
            total += size
            print(f"  {os.path.relpath(path, ROOT):48s} {size:>9d} bytes")
    print(f"  total {total} bytes")
    print(f"tiny: lm loss {tiny['lm_loss']:.6f}, cls loss {tiny['cls_loss']:.6f}, "
          f"worst f32 grad error {tiny['wg']:.1e}")
    print(f"vocab50257: loss {big['loss']:.6f}, {big['rows']} wte rows, "
          f"worst f32 grad error {big['wg']:.1e}")


if __name__ == "__main__":
    main()
