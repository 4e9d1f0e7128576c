"""Train a small Llama-style model on a 2-d ``dp x cp`` DeviceMesh: DDP over ``dp``,
hamilton-attn's context parallelism over ``cp``; check it against the same model run
without context parallelism and exit non-zero on a mismatch.

    torchrun --nproc_per_node 4 examples/train_2d_mesh.py            # dp 2 x cp 2
    torchrun --nproc_per_node 8 examples/train_2d_mesh.py --cp 4     # dp 2 x cp 4

CPU processes talk over gloo; with CUDA each process takes GPU ``LOCAL_RANK`` and NCCL,
with no change to the script.

What each rank does, per step (legend: B batch, S tokens, H heads, D head dim):

* its dp replica's batch: ``ids_BS`` packed documents, the *whole* sequence, the same
  on every cp rank of the replica; labels shifted over the whole sequence (the last
  token of each document predicts nothing: -100);
* ``plan(mask, mesh["cp"])``: the cp sub-mesh is the group that shares one sequence;
* ``dispatch`` the token ids and labels (never the embeddings: each rank embeds its own
  tokens, so the embedding gradient is each token's once), ``get_position_ids`` for
  RoPE; padding tokens (positions ``>= S``) see nothing, are seen by nothing, and their
  labels are set to -100;
* the model on the local tokens, attention through ``calc_attn``.

Gradient convention (exact, not approximately averaged): the loss of a step is the sum
of the cross-entropy of every labelled token of the global batch (all dp replicas)
divided by the global count of labelled tokens. Each rank's loss is its local sum
divided by that count, times dp, because DDP *averages* over the dp group; after the
backward, gradients are summed over the cp group. So every parameter's gradient is the
sum over all dp x cp ranks of d(local sum) / N_global, the gradient of the global mean.

The check: every rank also trains a copy of the model on the whole sequences of every
replica with one-device attention (``hamilton_attn.attention``, the same mask), and
compares the loss and every parameter's gradient each step.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

import hamilton_attn as ha

IGNORE = -100  # label of a token that predicts nothing (cross_entropy's ignore_index)


# --- the model: plain torch, no parallelism in it ----------------------------------


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x_BSHD: torch.Tensor, pos_S: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding at global positions ``pos_S`` (rotate-half form). RoPE scores
    depend on ``i - j`` only, so global positions give the same attention inside each
    packed document as positions reset per document."""
    d = x_BSHD.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x_BSHD.device, dtype=torch.float64) / d)
    angles_SD = torch.cat([pos_S.double()[:, None] * inv_freq] * 2, dim=-1)
    cos, sin = (f(angles_SD).to(x_BSHD.dtype)[None, :, None, :] for f in (torch.cos, torch.sin))
    x1, x2 = x_BSHD.chunk(2, dim=-1)
    return x_BSHD * cos + torch.cat([-x2, x1], dim=-1) * sin


class Block(torch.nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int):
        super().__init__()
        self.h, self.hk, self.d = n_heads, n_kv_heads, dim // n_heads
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.wq = torch.nn.Linear(dim, n_heads * self.d, bias=False)
        self.wkv = torch.nn.Linear(dim, 2 * n_kv_heads * self.d, bias=False)
        self.wo = torch.nn.Linear(n_heads * self.d, dim, bias=False)
        self.w_gate_up = torch.nn.Linear(dim, 2 * hidden, bias=False)
        self.w_down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x_BSE, pos_S, attend):
        b, s, _ = x_BSE.shape
        h = self.attn_norm(x_BSE)
        q_BSHD = self.wq(h).view(b, s, self.h, self.d)
        k_BSHD, v_BSHD = self.wkv(h).view(b, s, 2, self.hk, self.d).unbind(2)
        out_BSHD = attend(rope(q_BSHD, pos_S), rope(k_BSHD, pos_S), v_BSHD)  # GQA: Hk < Hq
        x_BSE = x_BSE + self.wo(out_BSHD.reshape(b, s, -1))
        gate, up = self.w_gate_up(self.mlp_norm(x_BSE)).chunk(2, dim=-1)
        return x_BSE + self.w_down(F.silu(gate) * up)


class Llama(torch.nn.Module):
    def __init__(self, vocab=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden=64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(
            Block(dim, n_heads, n_kv_heads, hidden) for _ in range(n_layers)
        )
        self.norm = RMSNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids_BS, pos_S, attend):
        """Logits ``[B, S, vocab]`` of the tokens given (a shard or a whole sequence);
        ``attend(q, k, v)`` is the attention, bshd in and out."""
        x_BSE = self.embed(ids_BS)
        for block in self.blocks:
            x_BSE = block(x_BSE, pos_S, attend)
        return self.head(self.norm(x_BSE))


# --- data ----------------------------------------------------------------------------


def batch(step: int, replica: int, seqlen: int, vocab: int, device):
    """Replica ``replica``'s batch at ``step``: ``(ids_BS, labels_BS, cu_seqlens)``, the
    whole packed sequence (B = 1), the same on every rank that asks."""
    g = torch.Generator().manual_seed(1000 * step + replica)
    cuts = torch.randperm(seqlen - 1, generator=g)[:3].add(1).sort().values.tolist()
    cu = [0, *cuts, seqlen]
    ids_BS = torch.randint(vocab, (1, seqlen), generator=g)
    labels_BS = torch.full_like(ids_BS, IGNORE)
    labels_BS[:, :-1] = ids_BS[:, 1:]  # shifted over the whole sequence, not per shard
    labels_BS[:, [e - 1 for e in cu[1:]]] = IGNORE  # a document's last token: no target
    return ids_BS.to(device), labels_BS.to(device), cu


def doc_mask(cu: list[int], kind: str) -> ha.Mask:
    return ha.Mask.varlen(cu, causal=True) if kind == "docs" else ha.Mask.causal(cu[-1])


# --- training --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cp", type=int, default=2, help="context-parallel ranks per replica")
    ap.add_argument("--seqlen", type=int, default=61, help="global tokens (S) per sequence")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mask", choices=("docs", "causal"), default="docs")
    ap.add_argument("--schedule", default="auto")
    ap.add_argument("--dispatch", default="auto")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--rtol", type=float, default=1e-4, help="allowed error / max |ref|")
    ap.add_argument(
        "--skip-cp-grad-sum", action="store_true", help="a deliberate mistake the check must catch"
    )
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun gives rank and address
    world = dist.get_world_size()
    if world % args.cp:
        raise SystemExit(f"--cp {args.cp} must divide the world size {world}")
    dp = world // args.cp
    mesh = init_device_mesh(device.type, (dp, args.cp), mesh_dim_names=("dp", "cp"))
    cp_mesh, dp_group = mesh["cp"], mesh.get_group("dp")
    replica = mesh.get_local_rank("dp")

    torch.manual_seed(0)  # the same initial weights everywhere
    model = Llama().to(device)
    ref = Llama().to(device)
    ref.load_state_dict(model.state_dict())
    vocab = model.embed.num_embeddings
    ddp = DDP(model, process_group=dp_group)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=args.lr)

    failed = False
    for step in range(args.steps):
        ids_BS, labels_BS, cu = batch(step, replica, args.seqlen, vocab, device)
        mask = doc_mask(cu, args.mask)
        p = ha.plan(mask, cp_mesh, schedule=args.schedule, dispatch=args.dispatch)
        pos_S = ha.get_position_ids(p, device=device)  # padding: positions >= S
        ids_l, labels_l = ha.dispatch(ids_BS, p), ha.dispatch(labels_BS, p)
        labels_l = labels_l.masked_fill(pos_S[None] >= args.seqlen, IGNORE)  # padding held 0

        n_global = (labels_BS != IGNORE).sum()  # this replica's whole sequence ...
        dist.all_reduce(n_global, group=dp_group)  # ... summed over the replicas
        logits = ddp(ids_l, pos_S, lambda q, k, v, p=p: ha.calc_attn(q, k, v, p))
        local_sum = F.cross_entropy(
            logits.flatten(0, 1).float(), labels_l.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        opt.zero_grad(set_to_none=True)
        (local_sum * dp / n_global).backward()  # DDP averages over dp: times dp undoes it
        if not args.skip_cp_grad_sum:
            for prm in model.parameters():
                dist.all_reduce(prm.grad, group=cp_mesh.get_group())
        loss = local_sum.detach().clone()
        dist.all_reduce(loss)  # every rank's local sum: the global batch's
        loss /= n_global

        # The same step without context parallelism: every replica's whole sequence.
        ref_opt.zero_grad(set_to_none=True)
        ref_sum = torch.zeros((), device=device)
        for r in range(dp):
            ids_r, labels_r, cu_r = batch(step, r, args.seqlen, vocab, device)
            mask_r = doc_mask(cu_r, args.mask)
            pos_r = torch.arange(args.seqlen, device=device)
            logits_r = ref(ids_r, pos_r, lambda q, k, v, m=mask_r: ha.attention(q, k, v, m))
            ref_sum = ref_sum + F.cross_entropy(
                logits_r.flatten(0, 1).float(), labels_r.flatten(), reduction="sum"
            )
        ref_loss = ref_sum / n_global
        ref_loss.backward()

        errs = {
            name: (a.grad - b.grad).abs().max().item() / max(b.grad.abs().max().item(), 1e-12)
            for (name, a), b in zip(model.named_parameters(), ref.parameters())
        }
        loss_err = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
        worst = max(errs, key=errs.get)
        ok = loss_err <= args.rtol and errs[worst] <= args.rtol
        flag = torch.tensor([0 if ok else 1], device=device)
        dist.all_reduce(flag)  # every rank stops together, none waits in a collective
        failed |= bool(flag.item())
        if dist.get_rank() == 0:
            print(
                f"step {step}: loss {loss.item():.6f} (reference {ref_loss.item():.6f}, rel "
                f"err {loss_err:.1e}); worst gradient {worst} rel err {errs[worst]:.1e}; "
                f"{int(flag.item())} rank(s) out of tolerance",
                flush=True,
            )
        if flag.item():
            break
        opt.step()
        ref_opt.step()

    if dist.get_rank() == 0:
        shape = f"dp {dp} x cp {args.cp} on {device.type}"
        print(("MISMATCH" if failed else "OK") + f": {shape}, {args.mask} mask", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
