"""Building blocks shared by the model families: norms, rotary embeddings, attention, MLPs, MoE blocks.

The modules are plain nn.Modules built on the meta device; the runtime binds real weight tensors
into them (hetero/runtime/weights.py) and never changes their forward. Shape legend:
B batch, T new tokens, S cached + new tokens, C hidden size, H query heads, K key/value heads,
D head dim, E experts, k experts per token, N = B*T tokens, I intermediate size.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelArgs
from ..errors import HeteroError


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, but one row of bf16 on the CPU (a decoded token) goes through torch.mv: the same result
    (tests/test_models.py), and a faster kernel than F.linear's for that shape on the CPU."""
    if bias is None and x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1]:
        return torch.mv(weight, x.reshape(-1)).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear computed by linear() above."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def meta_linear(n_in: int, n_out: int, bias: bool = False) -> nn.Linear:
    with torch.device("meta"):
        return Linear(n_in, n_out, bias=bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        # float32 statistics, as the reference implementations compute them
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ---------------------------------------------------------------- rotary embeddings

def rope_inv_freq(args: ModelArgs, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D_rot/2] and the cos/sin scale for the config's RoPE type.

    Args:
        args: model config (rope_theta, rope_scaling, head_dim, partial_rotary_factor).
        seq_len: tokens seen so far; only the "dynamic" type depends on it.
    """
    dim = int(args.head_dim * args.partial_rotary_factor)
    base = args.rope_theta
    rs = args.rope_scaling or {}
    kind = args.rope_type

    def plain(b):
        return 1.0 / (b ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))

    if kind == "default":
        return plain(base), 1.0
    if kind == "linear":
        return plain(base) / rs["factor"], 1.0
    if kind == "dynamic":
        max_pos = rs.get("original_max_position_embeddings", args.max_position_embeddings)
        factor = rs["factor"]
        if seq_len is not None and seq_len > max_pos:
            base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return plain(base), 1.0
    if kind == "llama3":
        inv = plain(base)
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, inv_l), 1.0
    if kind == "yarn":
        return _yarn(args, rs, dim, base)
    raise HeteroError(f"config.json: RoPE type {kind!r} is not supported (default, linear, dynamic, llama3, yarn)")


def _yarn(args: ModelArgs, rs: dict, dim: int, base: float) -> tuple[torch.Tensor, float]:
    orig = rs["original_max_position_embeddings"]
    factor = rs.get("factor") or args.max_position_embeddings / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rs.get("attention_factor")
    if attn is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attn = float(mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"]))
        else:
            attn = mscale(factor)
    fast, slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(fast), corr_dim(slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp
    inv = (1.0 / (factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate
    return inv, attn


class Rotary:
    """cos/sin tables for positions [start, start+T), computed in float32 as the reference does."""

    def __init__(self, args: ModelArgs):
        self.args = args
        self.inv_freq, self.scale = rope_inv_freq(args)

    def __call__(self, start: int, T: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq
        if self.args.rope_type == "dynamic":
            inv, _ = rope_inv_freq(self.args, start + T)
        pos = torch.arange(start, start + T, dtype=torch.float32)
        freqs = torch.outer(pos, inv)  # [T, D_rot/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.scale, emb.sin() * self.scale
        return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x [B, H, T, D]; cos/sin [T, D_rot]. Channels past D_rot are left as they are."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


# ---------------------------------------------------------------- attention

class Attention(nn.Module):
    """Multi-head attention with GQA and an external KV cache.

    Args:
        qkv_bias: q/k/v projections carry a bias (Qwen2).
        qk_norm: "head" for an RMSNorm over each head (Qwen3), "full" for one over the whole
            projection (OLMoE), None for neither.
        clip_qkv: clamp q, k and v to [-clip_qkv, clip_qkv] after the projections (OLMoE).
        o_bias: o_proj carries a bias; None follows config.json's attention_bias (Llama, Qwen3, OLMoE
            put it on all four projections; Qwen2 configs have no such key).
        window: sliding-window size (Mistral, Mixtral): a query sees only the last `window` keys.
    """

    def __init__(self, args: ModelArgs, qkv_bias: bool = False, qk_norm: str | None = None, clip_qkv=None,
                 o_bias: bool | None = None, window: int | None = None):
        super().__init__()
        self.window = window
        C, H, K, D = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.H, self.K, self.D = H, K, D
        self.q_proj = meta_linear(C, H * D, qkv_bias)
        self.k_proj = meta_linear(C, K * D, qkv_bias)
        self.v_proj = meta_linear(C, K * D, qkv_bias)
        self.o_proj = meta_linear(H * D, C, args.attention_bias if o_bias is None else o_bias)
        self.qk_norm = qk_norm
        self.clip_qkv = clip_qkv
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(D, args.rms_norm_eps), RMSNorm(D, args.rms_norm_eps)
        elif qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(H * D, args.rms_norm_eps), RMSNorm(K * D, args.rms_norm_eps)

    def forward(self, x, cos, sin, kv):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H*D], [B, T, K*D] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.H, self.D)
        k = k.view(B, T, self.K, self.D)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D], [B, K, T, D]
        v = v.view(B, T, self.K, self.D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # the cache computes attention: exact over a contiguous or paged store, or by retrieval
        o = kv.attend(q, k, v, self.D ** -0.5, self.window)  # [B, H, T, D]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.H * self.D))


# ---------------------------------------------------------------- feed-forward

class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, C: int, I: int, bias: bool = False):
        super().__init__()
        self.gate_proj = meta_linear(C, I, bias)
        self.up_proj = meta_linear(C, I, bias)
        self.down_proj = meta_linear(I, C, bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def expert_ffn(x, gate_w, up_w, down_w):
    """One expert's SwiGLU on the tokens routed to it: x [n, C] -> [n, C]."""
    return linear(F.silu(linear(x, gate_w)) * linear(x, up_w), down_w)


class SparseMoE(nn.Module):
    """Router + top-k experts (+ an optional gated shared expert).

    The experts' weights are not in this module: `self.experts` is injected by the runtime and
    computes `sum_j w[n, j] * expert[idx[n, j]](x[n])` wherever the weights happen to live.

    Args:
        norm_topk: renormalise the k routing weights to sum to 1.
        shared_I: intermediate size of a shared expert (Qwen2-MoE), gated by sigmoid(shared_expert_gate(x)).
    """

    def __init__(self, args: ModelArgs, layer_idx: int, norm_topk: bool, shared_I: int | None = None):
        super().__init__()
        C = args.hidden_size
        self.layer_idx = layer_idx
        self.top_k = args.num_experts_per_tok
        self.norm_topk = norm_topk
        self.gate = meta_linear(C, args.num_experts)
        self.experts = None  # injected: callable(x [N, C], idx [N, k], w [N, k]) -> [N, C]
        if shared_I:
            self.shared_expert = MLP(C, shared_I)
            self.shared_expert_gate = meta_linear(C, 1)
        else:
            self.shared_expert = None

    def route(self, x):
        """x [N, C] -> (indices [N, k], float32 weights [N, k])."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # [N, E]
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        return idx, w

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # [N, C]
        idx, w = self.route(flat)
        out = self.experts(flat, idx, w)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(B, T, C)


# ---------------------------------------------------------------- the decoder

class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, attn: nn.Module, ffn: nn.Module, ffn_name: str = "mlp"):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.ffn_name = ffn_name
        setattr(self, ffn_name, ffn)

    def forward(self, x, cos, sin, kv):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv)
        return x + getattr(self, self.ffn_name)(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs, layers: list[DecoderLayer]):
        super().__init__()
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """HF-shaped container (`model.*`, `lm_head`) so checkpoint names bind one to one.

    The runtime's executor drives it layer by layer; there is deliberately no forward here.
    """

    def __init__(self, args: ModelArgs, layers: list[DecoderLayer]):
        super().__init__()
        self.args = args
        self.model = Backbone(args, layers)
        self.lm_head = None if args.tie_word_embeddings else meta_linear(args.hidden_size, args.vocab_size)
        self.rotary = Rotary(args)

    def moe_blocks(self) -> list[SparseMoE]:
        return [m for m in self.modules() if isinstance(m, SparseMoE)]
