"""Test oracle: the eval-mode forward of the official T2T-ViT (yitu-opensource/T2T-ViT, models/), written out
functionally over a state dict with the official operations: nn.Unfold + transpose, the einsum Performer,
explicit softmax attention, and the transpose + reshape between soft splits. Independent of t2t_kernels' layers
(the Performer core is the package's copy of the official formula, kept for the benchmarks' eager baseline)."""
import torch
import torch.nn.functional as F

from t2t_kernels.ops.performer_attention.reference import performer_attention_official


def _linear(sd, prefix, x):
    return F.linear(x, sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias"))


def _norm(sd, prefix, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], 1e-5)


def _token_performer(sd, p, x):
    x = _norm(sd, f"{p}.norm1", x)
    kqv = _linear(sd, f"{p}.kqv", x)
    emb = kqv.shape[-1] // 3
    k, q, v = torch.split(kqv, emb, dim=-1)
    y = performer_attention_official(q, k, v, sd[f"{p}.w"], 1e-8)  # the official einsums, op for op
    x = v + _linear(sd, f"{p}.proj", y)
    return x + _linear(sd, f"{p}.mlp.2", F.gelu(_linear(sd, f"{p}.mlp.0", _norm(sd, f"{p}.norm2", x))))


def _softmax_attention(q, k, v, scale):
    attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return attn @ v


def _mlp(sd, p, x):
    return _linear(sd, f"{p}.fc2", F.gelu(_linear(sd, f"{p}.fc1", x)))


def _token_transformer(sd, p, x):
    dim = x.shape[-1]
    x = _norm(sd, f"{p}.norm1", x)
    qkv = _linear(sd, f"{p}.attn.qkv", x)
    B, N, three_in = qkv.shape
    in_dim = three_in // 3
    q, k, v = qkv.reshape(B, N, 3, 1, in_dim).permute(2, 0, 3, 1, 4)
    out = _softmax_attention(q, k, v, dim**-0.5).transpose(1, 2).reshape(B, N, in_dim)
    x = v.squeeze(1) + _linear(sd, f"{p}.attn.proj", out)
    return x + _mlp(sd, f"{p}.mlp", _norm(sd, f"{p}.norm2", x))


def _block(sd, p, x, num_heads, qk_scale):
    B, N, C = x.shape
    qkv = _linear(sd, f"{p}.attn.qkv", _norm(sd, f"{p}.norm1", x))
    q, k, v = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    scale = qk_scale or (C // num_heads) ** -0.5
    out = _softmax_attention(q, k, v, scale).transpose(1, 2).reshape(B, N, C)
    x = x + _linear(sd, f"{p}.attn.proj", out)
    return x + _mlp(sd, f"{p}.mlp", _norm(sd, f"{p}.norm2", x))


def official_forward(sd, x, tokens_type, num_heads, qk_scale=None):
    layer = _token_performer if tokens_type == "performer" else _token_transformer
    H, W = x.shape[-2:]
    x = F.unfold(x, (7, 7), stride=(4, 4), padding=(2, 2)).transpose(1, 2)
    x = layer(sd, "tokens_to_token.attention1", x)
    B, _, C = x.shape
    x = x.transpose(1, 2).reshape(B, C, H // 4, W // 4)
    x = F.unfold(x, (3, 3), stride=(2, 2), padding=(1, 1)).transpose(1, 2)
    x = layer(sd, "tokens_to_token.attention2", x)
    B, _, C = x.shape
    x = x.transpose(1, 2).reshape(B, C, H // 8, W // 8)
    x = F.unfold(x, (3, 3), stride=(2, 2), padding=(1, 1)).transpose(1, 2)
    x = _linear(sd, "tokens_to_token.project", x)
    x = torch.cat((sd["cls_token"].expand(B, -1, -1), x), dim=1) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        x = _block(sd, f"blocks.{i}", x, num_heads, qk_scale)
    x = _norm(sd, "norm", x)[:, 0]
    return _linear(sd, "head", x) if "head.weight" in sd else x
