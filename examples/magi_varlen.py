"""MagiAttention's "Basic Usage For Varlen Api" example, run on hamilton-attn.

The body below is the example of MagiAttention's API docs verbatim, except the import
line; the section at the end checks the result against one device. Run on 2 GPUs:

    torchrun --nproc_per_node 2 examples/magi_varlen.py
"""

# The example as MagiAttention's docs print it (kept out of the formatter).
# fmt: off
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from hamilton_attn.compat.magi import (
    AttnOverlapMode,
    DispatchConfig,
    DistAttnConfig,
    MinHeapDispatchAlg,
    OverlapConfig,
    UniformOverlapAlg,
    calc_attn,
    compute_pad_size,
    full_attention_to_varlen_attention,
    magi_attn_varlen_dispatch,
    squash_batch_dim,
    undispatch,
)

# ---  prepare data and args for magi_attention --- #
# init params
embed_dim = 1024
dtype = torch.bfloat16
cp_size = 2
head_dim = 128
chunk_size = 512
q_heads = 48
kv_heads = 8
batch_size = 5
seqlen = 25

dist_attn_config = DistAttnConfig(
    dispatch_config=DispatchConfig(alg=MinHeapDispatchAlg()),
    overlap_config=OverlapConfig(
        enable=True,
        mode=AttnOverlapMode.STATIC,
        degree=2,
        min_chunk_size=512,
        max_num_chunks=64,
        alg=UniformOverlapAlg(
            random_costs=True,
            random_seed=42,
        ),
    ),
    high_bandwith_domain_size=1,
)

# init distributed environment if necessary
rank = int(os.environ["RANK"])
world_size = int(os.environ["WORLD_SIZE"])
assert world_size == cp_size
dist.init_process_group(
    backend="nccl",
    world_size=world_size,
    rank=rank,
    timeout=timedelta(minutes=30),
)
local_rank = rank % 8
torch.cuda.set_device(local_rank)
device = torch.cuda.current_device()

# init cp_group
cp_group = dist.new_group(list(range(cp_size)), backend="nccl")
cp_mesh = None
# if you want to use hierarchical_comm
# first export MAGI_ATTENTION_HIERARCHICAL_COMM = 1 and CUDA_DEVICE_MAX_CONNECTIONS = 8
# second set cp_group = None and init cp_mesh with init_hierarchical_mesh function

# create input data with shape (bs, seqlen, h)
x_with_batch = torch.randn(
    batch_size, seqlen, embed_dim, device=device, dtype=dtype, requires_grad=True
)

# squash the batch dim, magi_attention do not support input data with batch dim.
x = squash_batch_dim(x_with_batch)  # ((b, seqlen), h)

# get cu_seqlens_q,k after squashing.
cu_seqlens_q, cu_seqlens_k = full_attention_to_varlen_attention(batch_size, seqlen)
total_seqlen_q: int = batch_size * seqlen
total_seqlen_k: int = batch_size * seqlen

# pad input seqlen for better performance
pad_size = compute_pad_size(total_seqlen_q, cp_size, head_dim, chunk_size)

# ---   magi_attention dispatch   --- #

# dispatch global input tensor to each rank and get the runtime_key
(
    local_x,
    magi_attn_runtime_key,
) = magi_attn_varlen_dispatch(  # local_x with shape ((total_seq + pad_size) / cp_size), h)
    x,
    cu_seqlens_q,
    cu_seqlens_k,
    head_dim=head_dim,
    pad_size=pad_size,
    chunk_size=chunk_size,
    cp_group=cp_group,
    cp_mesh=cp_mesh,
    causal=False,
    dist_attn_config=dist_attn_config,
)

# ---  magi_attention calculation and undispatch  --- #
# do q k v projection, here's just an example
q_proj = torch.nn.Linear(embed_dim, q_heads * head_dim, dtype=dtype, device=device)
k_proj = torch.nn.Linear(embed_dim, kv_heads * head_dim, dtype=dtype, device=device)
v_proj = torch.nn.Linear(embed_dim, kv_heads * head_dim, dtype=dtype, device=device)

local_q, local_k, local_v = (
    q_proj(local_x).view(-1, q_heads, head_dim),
    k_proj(local_x).view(-1, kv_heads, head_dim),
    v_proj(local_x).view(-1, kv_heads, head_dim),
)  # q, k, v with shape ((bs * seqlen + pad_size) / cp_size, nh, hd)

# Do local attention computation with runtime key
local_out, _ = calc_attn(
    local_q, local_k, local_v, magi_attn_runtime_key
)  # local out with shape ((bs * seqlen + pad_size) / cp_size, nh, hd)

# Gather local attention results to global result with runtime key
total_out = undispatch(
    local_out, magi_attn_runtime_key
)  # total out with shape (bs * seqlen, nh, hd)

# fmt: on

# ---  check against one device (not part of MagiAttention's example)  --- #
# The body draws x and the layer weights from CUDA generators that are seeded
# differently in every process, so each rank projected its own tokens of its own x with
# its own layers: the global q, k, v that context parallelism attended over are the
# local ones gathered (with equal seeds, the same layers applied to the gathered x).
# Recompute that attention on one device with hamilton_attn.attention and the same
# mask: the distributed out may be at most twice as far from a float32 reference as
# the one-device result in the same dtype is (flash-attention's rule), plus a few ulps.
import hamilton_attn as ha  # noqa: E402

with torch.no_grad():
    total_q, total_k, total_v = (
        undispatch(t, magi_attn_runtime_key) for t in (local_q, local_k, local_v)
    )
    mask = ha.Mask.varlen(cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), causal=False)
    ref_same = ha.attention(total_q[None], total_k[None], total_v[None], mask)[0]
    ref_fp32 = ha.attention(
        total_q[None].float(), total_k[None].float(), total_v[None].float(), mask
    )[0]
    err = (total_out.float() - ref_fp32).abs().max().item()
    base = (ref_same.float() - ref_fp32).abs().max().item()
    bound = 2 * base + 4 * torch.finfo(dtype).eps * max(1.0, ref_fp32.abs().max().item())
    assert total_out.shape == ref_same.shape, (total_out.shape, ref_same.shape)
    assert err <= bound, f"rank {rank}: max error {err:.3e} > {bound:.3e}"
print(f"rank {rank}: OK (max error {err:.2e}, one-device {dtype} error {base:.2e})")
dist.destroy_process_group()
