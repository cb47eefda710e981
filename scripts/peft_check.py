#!/usr/bin/python3
"""Hugging Face PEFT's LoRA loading rules for GPT-2, re-implemented in plain torch.

PEFT itself (and `transformers`) need not be installed: this script reads a GPT-2 checkpoint
(`config.json` + `model.safetensors`, Hugging Face names) and a PEFT adapter directory
(`adapter_config.json` + `adapter_model.safetensors`) with its own safetensors reader, and
runs GPT-2 the way `PeftModel` does with the adapter active (not merged):

  * the adapted modules are the model's modules whose name equals an entry of
    `target_modules` or ends with "." + that entry (a string is a regex matched against the
    whole name; "all-linear" is every linear but the output layer), restricted to
    `layers_to_transform`, never a module of `modules_to_save`;
  * a module's rank and alpha come from the first key k of `rank_pattern` / `alpha_pattern`
    with `(.*\\.)?(k)$` matching its name, else `r` / `lora_alpha`; its scale is alpha / r
    (alpha / sqrt(r) with `use_rslora`);
  * a Conv1D linear (weight [in, out]) with `lora_A.weight` [r, in] and `lora_B.weight`
    [out, r] computes y = x W + b + s * (x A^T) B^T; merged, W += s * (B A)^T (GPT-2's Conv1D
    is always fan_in_fan_out, whatever the config says);
  * the embedding with `lora_embedding_A` [r, V] and `lora_embedding_B` [d, r] adds
    s * A^T[token] B^T;
  * each module of `modules_to_save` takes its saved weight (`score.weight`: the classifier);
  * tensor names carry the `base_model.model.` prefix; a module selected whose weights are
    missing keeps PEFT's initialisation (B = 0: no change), as `load_state_dict(strict=False)`.

Commands:

  logits --model DIR [--adapter DIR] --tokens FILE --out FILE [--task lm|cls]
      FILE holds {"tokens": [[id, ...], ...]} (equal lengths, no padding: classification pools
      the last token, as GPT2ForSequenceClassification does). Writes {"logits": [...] (flat),
      "shape": [...], "merged_max_diff": ..., "adapter_effect": ...}: the largest difference
      between the adapter applied in the forward and merged into the weights, and between the
      adapted model and the model without the LoRA weights (the saved classifier kept).
  write --model DIR --out DIR [--seed N] [--r R] [--alpha A] [--target-modules LIST]
        [--task CAUSAL_LM|SEQ_CLS] [--num-labels K] [--rank-pattern JSON] [--alpha-pattern JSON]
        [--rslora] [--layers LIST]
      Writes a PEFT adapter directory with random (seeded, nonzero) A and B, and a random
      classifier for SEQ_CLS.

Run with Debian's torch: /usr/bin/python3 scripts/peft_check.py ...
"""

import argparse
import json
import math
import os
import re
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(1)
PREFIX = "base_model.model."
DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        raw = data[b:e]
        if info["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(raw, dtype=np.dtype(DTYPES[info["dtype"]]).newbyteorder("<"))
        out[name] = torch.from_numpy(a.astype(np.float32).reshape(info["shape"]))
    return out


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    chunks, off = [], 0
    for name, t in tensors.items():
        raw = t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(chunks))


def load_model(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    sd = read_safetensors(os.path.join(d, "model.safetensors"))
    # module names as in GPT2ForSequenceClassification / GPT2LMHeadModel
    p = {}
    for k, v in sd.items():
        if ".attn.bias" in k or ".attn.masked_bias" in k or k == "lm_head.weight":
            continue
        p[k if k.startswith("transformer.") or k.startswith("score.") else "transformer." + k] = v
    return cfg, p


def module_names(cfg):
    names = ["transformer.wte"]
    for i in range(cfg["n_layer"]):
        names += [f"transformer.h.{i}.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    return names


def pattern_key(pattern, key):
    for k in pattern or {}:
        if re.match(rf"(.*\.)?({k})$", key):
            return k
    return None


def selected(c, key):
    saved = c.get("modules_to_save") or []
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in saved):
        return False
    tm = c.get("target_modules")
    if tm == "all-linear":
        found = key != "transformer.wte"
    elif isinstance(tm, str):
        found = re.fullmatch(tm, key) is not None
    else:
        found = key in tm or any(key.endswith("." + t) for t in tm)
    layers = c.get("layers_to_transform")
    if found and layers is not None:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", key)
        if m is None:
            return False
        idx = int(m.group(1))
        found = idx == layers if isinstance(layers, int) else idx in layers
    return found


def load_adapter(d, cfg):
    c = json.load(open(os.path.join(d, "adapter_config.json")))
    assert c["peft_type"] == "LORA", c["peft_type"]
    sd = read_safetensors(os.path.join(d, "adapter_model.safetensors"))
    sd = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in sd.items()}
    lora = {}
    for key in module_names(cfg):
        if not selected(c, key):
            continue
        r = c.get("rank_pattern", {}).get(pattern_key(c.get("rank_pattern"), key), c["r"])
        alpha = c.get("alpha_pattern", {}).get(pattern_key(c.get("alpha_pattern"), key), c["lora_alpha"])
        s = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
        an, bn = (f"{key}.lora_embedding_A", f"{key}.lora_embedding_B") if key.endswith("wte") else (f"{key}.lora_A.weight", f"{key}.lora_B.weight")
        if an not in sd or bn not in sd:
            print(f"note: {key} selected but not in the file (B = 0)", file=sys.stderr)
            continue
        A, B = sd[an], sd[bn]
        assert A.shape[0] == r and B.shape[1] == r, f"{key}: rank {r}, got {tuple(A.shape)} {tuple(B.shape)}"
        lora[key] = (A, B, s)
    saved = {}
    for m in c.get("modules_to_save") or []:
        for k in (f"{m}.weight", f"{m}.modules_to_save.weight"):
            if k in sd:
                saved[f"{m}.weight"] = sd[k]
    return c, lora, saved


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def forward(cfg, p, lora, tokens, task):
    """GPT-2 (HF semantics) with the adapters applied in the forward, as PEFT's unmerged layers."""
    B, T = tokens.shape
    C, H = cfg["n_embd"], cfg["n_head"]
    dh, eps = C // H, cfg.get("layer_norm_epsilon", 1e-5)

    def conv1d(x, key):
        y = x @ p[key + ".weight"] + p[key + ".bias"]
        if key in lora:
            A, Bm, s = lora[key]
            y = y + (x @ A.t()) @ Bm.t() * s
        return y

    x = p["transformer.wte.weight"][tokens]
    if "transformer.wte" in lora:
        A, Bm, s = lora["transformer.wte"]
        x = x + F.embedding(tokens, A.t()) @ Bm.t() * s
    x = x + p["transformer.wpe.weight"][torch.arange(T)][None]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(cfg["n_layer"]):
        h = f"transformer.h.{i}."
        a = F.layer_norm(x, (C,), p[h + "ln_1.weight"], p[h + "ln_1.bias"], eps)
        q, k, v = (t.view(B, T, H, dh).transpose(1, 2) for t in conv1d(a, h + "attn.c_attn").split(C, dim=-1))
        att = torch.softmax(((q @ k.transpose(-2, -1)) / math.sqrt(dh)).masked_fill(~causal, float("-inf")), dim=-1)
        x = x + conv1d((att @ v).transpose(1, 2).reshape(B, T, C), h + "attn.c_proj")
        m = F.layer_norm(x, (C,), p[h + "ln_2.weight"], p[h + "ln_2.bias"], eps)
        x = x + conv1d(gelu_new(conv1d(m, h + "mlp.c_fc")), h + "mlp.c_proj")
    x = F.layer_norm(x, (C,), p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    if task == "cls":
        return x[:, -1] @ p["score.weight"].t()
    return x @ p["transformer.wte.weight"].t()


def merged(p, lora):
    """The weights with each adapter merged as PEFT's merge_and_unload does."""
    q = dict(p)
    for key, (A, B, s) in lora.items():
        w = key + ".weight"
        q[w] = p[w] + (B @ A).t() * s  # fan_in_fan_out: (B A)^T; the embedding likewise
    return q


def cmd_logits(a):
    cfg, p = load_model(a.model)
    lora, task = {}, a.task
    if a.adapter:
        c, lora, saved = load_adapter(a.adapter, cfg)
        p.update(saved)
        task = task or ("cls" if c.get("task_type") == "SEQ_CLS" else "lm")
    task = task or ("cls" if "score.weight" in p else "lm")
    tokens = torch.tensor(json.load(open(a.tokens))["tokens"], dtype=torch.long)
    with torch.no_grad():
        out = forward(cfg, p, lora, tokens, task)
        diff = (forward(cfg, merged(p, lora), {}, tokens, task) - out).abs().max().item()
        effect = (forward(cfg, p, {}, tokens, task) - out).abs().max().item()
    json.dump({"task": task, "shape": list(out.shape), "logits": out.reshape(-1).tolist(), "merged_max_diff": diff,
               "adapter_effect": effect, "adapted_modules": sorted(lora)}, open(a.out, "w"))


def cmd_write(a):
    cfg, _ = load_model(a.model)
    g = torch.Generator().manual_seed(a.seed)
    tm = [t for t in a.target_modules.split(",") if t]
    tm = tm[0] if tm == ["all-linear"] else tm  # PEFT's shorthand is a string
    c = {
        "peft_type": "LORA", "task_type": a.task, "base_model_name_or_path": os.path.abspath(a.model), "revision": None,
        "inference_mode": True, "r": a.r, "lora_alpha": a.alpha, "lora_dropout": 0.0, "target_modules": tm,
        "fan_in_fan_out": True, "bias": "none", "use_rslora": a.rslora, "init_lora_weights": True,
        "modules_to_save": ["classifier", "score"] if a.task == "SEQ_CLS" else None,
        "layers_to_transform": [int(x) for x in a.layers.split(",")] if a.layers else None, "layers_pattern": None,
        "rank_pattern": json.loads(a.rank_pattern), "alpha_pattern": json.loads(a.alpha_pattern), "use_dora": False,
    }
    C, V = cfg["n_embd"], cfg["vocab_size"]
    dims = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}
    t = {}
    for key in module_names(cfg):
        if not selected(c, key):
            continue
        r = c["rank_pattern"].get(pattern_key(c["rank_pattern"], key), c["r"])
        if key.endswith("wte"):
            t[f"{PREFIX}{key}.lora_embedding_A"] = 0.3 * torch.randn(r, V, generator=g)
            t[f"{PREFIX}{key}.lora_embedding_B"] = 0.3 * torch.randn(C, r, generator=g)
        else:
            din, dout = dims[key.split(".", 3)[3]]
            t[f"{PREFIX}{key}.lora_A.weight"] = torch.randn(r, din, generator=g) / math.sqrt(din)
            t[f"{PREFIX}{key}.lora_B.weight"] = 0.2 * torch.randn(dout, r, generator=g)
    if a.task == "SEQ_CLS":
        t[f"{PREFIX}score.weight"] = 0.2 * torch.randn(a.num_labels, C, generator=g)
    os.makedirs(a.out, exist_ok=True)
    write_safetensors(os.path.join(a.out, "adapter_model.safetensors"), t, {"format": "pt"})
    with open(os.path.join(a.out, "adapter_config.json"), "w") as f:
        json.dump(c, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    lg = sub.add_parser("logits")
    lg.add_argument("--model", required=True)
    lg.add_argument("--adapter")
    lg.add_argument("--tokens", required=True)
    lg.add_argument("--out", required=True)
    lg.add_argument("--task", choices=["lm", "cls"])
    wr = sub.add_parser("write")
    wr.add_argument("--model", required=True)
    wr.add_argument("--out", required=True)
    wr.add_argument("--seed", type=int, default=0)
    wr.add_argument("--r", type=int, default=4)
    wr.add_argument("--alpha", type=float, default=8)
    wr.add_argument("--target-modules", default="c_attn,c_proj,c_fc")
    wr.add_argument("--task", choices=["CAUSAL_LM", "SEQ_CLS"], default="CAUSAL_LM")
    wr.add_argument("--num-labels", type=int, default=2)
    wr.add_argument("--rank-pattern", default="{}")
    wr.add_argument("--alpha-pattern", default="{}")
    wr.add_argument("--rslora", action="store_true")
    wr.add_argument("--layers")
    a = ap.parse_args()
    torch.manual_seed(0)
    {"logits": cmd_logits, "write": cmd_write}[a.cmd](a)


if __name__ == "__main__":
    main()
