"""Reference sentence embedding of all-MiniLM-L6-v2 for clipcid's BERT text-tower test.

A plain-PyTorch BERT forward written from the `transformers` BertModel definition (post-norm
blocks, erf GELU, additive -inf attention mask), mean pooling over non-padding tokens and L2
normalisation as sentence-transformers does. It shares no code with candle.

    python scripts/reference/minilm_reference.py data/raw/minilm
"""
import json
import math
import sys

import torch
from safetensors.torch import load_file

folder = sys.argv[1]
cfg = json.load(open(f"{folder}/config.json"))
w = load_file(f"{folder}/model.safetensors")
H, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]


def ln(x, p):
    return torch.nn.functional.layer_norm(x, (H,), w[p + ".weight"], w[p + ".bias"], eps)


def lin(x, p):
    return x @ w[p + ".weight"].T + w[p + ".bias"]


def embed(ids):
    ids = torch.tensor([ids])
    mask = (ids != 0).float()
    t = ids.shape[1]
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][:t]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = ln(x, "embeddings.LayerNorm")
    add = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
    d = H // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        split = lambda y: y.view(1, t, heads, d).transpose(1, 2)
        q, k, v = (split(lin(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + add, dim=-1) @ v
        a = a.transpose(1, 2).reshape(1, t, H)
        x = ln(lin(a, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        h = torch.nn.functional.gelu(lin(x, f"{p}.intermediate.dense"))
        x = ln(lin(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)[0]


# "a photo of a cat" and "the stock market fell" in BERT uncased WordPiece ids, padded.
for ids in ([101, 1037, 6302, 1997, 1037, 4937, 102, 0, 0],
            [101, 1996, 4518, 3006, 3062, 102, 0, 0, 0]):
    e = embed(ids)
    print(ids, [round(float(v), 6) for v in e[:8]])
