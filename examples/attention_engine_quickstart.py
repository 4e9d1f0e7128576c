"""AttentionEngine's quick start on hamilton-attn: online softmax with a causal block mask.

The seed's script with its import lines changed and smaller shapes (CPU or GPU), then a
check against ``hamilton_attn.attention``. Run: ``python examples/attention_engine_quickstart.py``.
The engine recognises the online function as softmax and the score_mod as a scale, so
the call runs on the library's fast path (``mod.route`` says which).
"""

import torch

from hamilton_attn.compat.attention_engine import (
    AttentionEngine,
    CustomIO,
    OnlineFunc,
    SymbolScalar,
    Var,
    create_block_mask,  # noqa: F401 - imported by the seed's script
    meta_tensor,
)

D = 64
softmax_scale = 1 / D**0.5


# define elementwise modification on attention scores
def score_mod(score, custom_fwd_inputs, b, h, q_idx, kv_idx):
    return score * softmax_scale


# define custom inputs, here none
custom_fwd_inputs = CustomIO({})


# define OnlineSoftmax as a subclass of OnlineFunc
class OnlineSoftmax(OnlineFunc):
    def __init__(self):
        """
        define online_rowscales and final_rowscales
        """
        online_rowscales = {
            "m": SymbolScalar("m", Var("-inf")),
            "r": SymbolScalar("r", Var("0.0")),
        }
        final_rowscales = {
            "lse": SymbolScalar("lse", Var("0.0")),
        }
        external_fwd_inputs = custom_fwd_inputs
        super().__init__(online_rowscales, final_rowscales, external_fwd_inputs)

    @staticmethod
    def online_fwd(scores, online_rowscales, b, h, q_idx):
        m, r = online_rowscales["m"], online_rowscales["r"]
        m_new = m.max(scores.get_reduce("max"))
        scale_tmp = (m - m_new).exp()
        r = r * scale_tmp

        scores = (scores - m_new).exp()
        r = r + scores.get_reduce("sum")

        new_online_rowscales = {
            "m": m_new,
            "r": r,
        }
        o_scale = scale_tmp
        return scores, new_online_rowscales, o_scale

    @staticmethod
    def online_fwd_epilogue(o, online_rowscales, b, h, q_idx):
        o_new = o / online_rowscales["r"]
        lse = (online_rowscales["r"]).log() + online_rowscales["m"]
        final_rowscales = {
            "lse": lse,
        }
        return o_new, final_rowscales

    @staticmethod
    def forward(scores, final_rowscales, b, h, q_idx, kv_idx):
        lse = final_rowscales["lse"]
        scores_new = (scores - lse).exp()
        return scores_new

    @staticmethod
    def backward(dp, scores, final_rowscales, doosum_rowscales, b, h, q_idx, kv_idx):
        dppsum = doosum_rowscales
        dscores = (dp - dppsum) * scores
        return dscores


# mask on attention score
def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def main(B=1, H=4, S=256, DV=64, device=None, dtype=None):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    qkv_meta = (
        meta_tensor(B, H, S, D, dtype=dtype),
        meta_tensor(B, H, S, D, dtype=dtype),
        meta_tensor(B, H, S, DV, dtype=dtype),
    )

    # generate runtime attention op
    mod = AttentionEngine(
        qkv_meta,
        custom_fwd_inputs,
        score_mod=score_mod,
        block_mask=causal_mask,
        online_func=OnlineSoftmax(),
        tune=False,
        tune_file="mha_tune.json",
    )

    # pytorch call
    q = torch.randn(B, S, H, D, dtype=dtype, device=device)
    k = torch.randn(B, S, H, D, dtype=dtype, device=device)
    v = torch.randn(B, S, H, DV, dtype=dtype, device=device)
    out = mod(q, k, v)
    out.backward(torch.ones_like(out))

    # The same through the library's own call, forward and backward (the engine made
    # leaves of q, k, v, which do not require grad: mod.last_leaves holds their grads).
    import hamilton_attn

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = hamilton_attn.attention(*leaves, causal=True, scale=softmax_scale)
    ref.backward(torch.ones_like(ref))
    pairs = [(out, ref)] + [(a.grad, b.grad) for a, b in zip(mod.last_leaves, leaves)]
    err = max(
        (a.float() - b.float()).abs().max().item() / max(1.0, b.float().abs().max().item())
        for a, b in pairs
    )
    print(
        f"route: {mod.route}; {device} {dtype}; out, dq, dk, dv against attention()'s: "
        f"max relative difference {err:.3g}"
    )
    assert err <= (1e-5 if dtype in (torch.float32, torch.float64) else 2e-2), err
    return mod, err


if __name__ == "__main__":
    main()
