"""A DeviceMesh wherever a group is taken (``runtime.comm.as_group``): ``plan()``,
``ContextParallelAttention``, ``compat.hamilton``'s ``process_group`` and
``compat.magi``'s ``cp_group`` / ``cp_mesh``; results equal to the process group's, and
a clear ValueError naming the argument for anything else, before any communication.

The pooled tests build a ``(dp 4, cp 4)`` mesh over the shared pool's whole world (16
ranks): DeviceMesh creates its groups collectively over the world, so every rank of the
pool takes part."""

from __future__ import annotations

import zlib

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn.compat import hamilton as seed
from hamilton_attn.compat.magi import magi_attn_varlen_dispatch
from hamilton_attn.compat.magi import undispatch as magi_undispatch
from hamilton_attn.compat.magi._groups import resolve_group
from hamilton_attn.runtime.comm import as_group
from hamilton_attn.testing.oracle import attention_oracle, dense_varlen, max_err

W = 16
DP, CP = 4, 4
TOL = 1e-10  # float64 against the float64 oracle


def _mesh(shape=(DP, CP), names=("dp", "cp")):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh("cpu", torch.arange(W).reshape(shape), mesh_dim_names=names)


# --- no process group needed -----------------------------------------------------------


@pytest.mark.parametrize("bad", ["world", 3, object(), [0, 1]])
def test_neither_group_nor_mesh_is_refused_naming_the_argument(bad):
    m = ha.Mask.causal(16)
    kind = type(bad).__name__
    with pytest.raises(ValueError, match=rf"^group: expected a torch.distributed .*got {kind}"):
        ha.plan(m, bad)
    with pytest.raises(ValueError, match=rf"^group: expected .*got {kind}"):
        ha.ContextParallelAttention(m, bad)
    with pytest.raises(ValueError, match=rf"^process_group: expected .*got {kind}"):
        seed.RingComm(bad)
    with pytest.raises(ValueError, match=rf"^process_group: expected .*got {kind}"):
        seed.A2AComm(bad)
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=rf"^process_group: expected .*got {kind}"):
        seed.ring_attention_forward_flash_attn(bad, q, q, q, None)
    with pytest.raises(ValueError, match=rf"^process_group: expected .*got {kind}"):
        seed.hamilton_attention_forward_full_flash_attn(bad, q, q, q, None, world_size=1)
    with pytest.raises(ValueError, match=rf"^cp_group: expected .*got {kind}"):
        resolve_group(bad, None, 1)


def test_groups_pass_through_unchanged():
    g = ha.SimulatedGroup(4, 1)
    assert as_group(g).group is g and as_group(None).group is None
    spec = as_group(g)
    assert (spec.rank_order, spec.ulysses_degree, spec.node_size) == (None, None, None)


def test_a_plan_with_a_group_of_its_own_is_refused():
    p = ha.plan(ha.Mask.causal(16), ha.SimulatedGroup(2))
    with pytest.raises(ValueError, match="group: a Plan carries its own group and options"):
        ha.ContextParallelAttention(p, ha.SimulatedGroup(2))
    with pytest.raises(ValueError, match=r"\(schedule\)"):
        ha.ContextParallelAttention(p, schedule="ring")


# --- on the pool: a (dp, cp) mesh --------------------------------------------------------


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _oracle(q, k, v, cu):
    """float64 out (bshd) and the gradients of ``(out * g).sum()`` for a fixed g."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, _ = attention_oracle(*(t.transpose(1, 2) for t in leaves), dense_varlen(cu, causal=True),
                              None)  # fmt: skip
    return out.transpose(1, 2), leaves


def _mesh_cases(ctx):
    """On every rank: plans, forward and backward through ``mesh["cp"]`` against the
    process group and the oracle, and the refusals of meshes of the wrong shape."""
    import torch.distributed as dist

    mesh = _mesh()
    cp = mesh["cp"]
    replica = mesh.get_local_rank("dp")
    out = {}
    # The cp sub-mesh is the group of this rank's row, and plans as that group does.
    s, cu = 37, [0, 11, 30, 37]
    mask = ha.Mask.varlen(cu, causal=True)
    p_mesh = ha.plan(mask, cp, schedule="ring", dispatch="zigzag")
    p_group = ha.plan(mask, cp.get_group(), schedule="ring", dispatch="zigzag")
    out["ranks"] = p_mesh.group_ranks
    out["same_plan"] = p_mesh is p_group and p_mesh.fingerprint == p_group.fingerprint
    out["rank"] = (p_mesh.rank, p_mesh.world_size)

    # Forward and backward, fresh inputs per replica (each replica its own sequence).
    g = torch.Generator().manual_seed(_seed("mesh", replica))
    q = torch.randn(1, s, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, s, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(1, s, 4, 8, generator=g, dtype=torch.float64)
    ref, leaves = _oracle(q, k, v, cu)
    (ref * dout).sum().backward()
    errs = []
    module = ha.ContextParallelAttention(mask, cp, schedule="groupcast", dispatch="minheap",
                                         chunk_size=4)  # fmt: skip
    for attend, p in ((lambda *t: ha.calc_attn(*t, p_mesh), p_mesh), (module, module.plan)):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        o = ha.undispatch(attend(*(ha.dispatch(t, p) for t in qkv)), p)
        (o * dout).sum().backward()
        errs.append(max(max_err(o, ref), *(max_err(a.grad, b.grad) for a, b in zip(qkv, leaves))))
    out["errs"] = errs
    out["module_ranks"] = module.plan.group_ranks

    # compat.hamilton: the seed's ring attention on the sub-mesh equals it on the group.
    r = cp.get_local_rank()
    q_l, k_l, v_l = (t[:, r * 8 : (r + 1) * 8] for t in (q, k, v))
    a = seed.ring_attention_forward_flash_attn(cp, q_l, k_l, v_l, None, causal=True)
    b = seed.ring_attention_forward_flash_attn(cp.get_group(), q_l, k_l, v_l, None, causal=True)
    out["seed_equal"] = all(torch.equal(x, y) for x, y in zip(a, b))
    ring = seed.RingComm(cp)
    out["ring"] = (ring.rank, ring.world_size, ring.send_rank, ring.recv_rank)
    # compat.magi: a 1-d sub-mesh as cp_group (MagiAttention >= 1.0's cp_group_or_mesh)
    # and as cp_mesh.
    x = torch.randn(s, 3, generator=torch.Generator().manual_seed(_seed("x", replica)))
    shards = []
    for kw in (dict(cp_group=cp), dict(cp_mesh=cp), dict(cp_group=cp.get_group())):
        local, key = magi_attn_varlen_dispatch(x, cu, cu, chunk_size=4, causal=True, **kw)
        shards.append(local)
        out.setdefault("magi_ranks", []).append(key.plan.group_ranks)
        out.setdefault("magi_round_trip", []).append(torch.equal(magi_undispatch(local, key), x))
    out["magi_equal"] = all(torch.equal(shards[0], t) for t in shards)
    out["magi_resolve"] = resolve_group(None, cp, 1)[1:]

    # Meshes of the wrong shape: a ValueError naming the argument, on every rank, with no
    # message (so nothing here may wait for a peer).
    def err(fn):
        try:
            fn()
        except ValueError as e:
            return str(e)
        return "accepted"

    mesh3 = _mesh((2, 2, 4), ("pp", "dp", "cp"))
    out["errors"] = [
        err(lambda: ha.plan(mask, mesh)),
        err(lambda: ha.plan(mask, mesh3)),
        err(lambda: ha.ContextParallelAttention(mask, mesh)),
        err(lambda: seed.RingComm(mesh)),
        err(lambda: seed.ring_attention_forward_flash_attn(mesh, q_l, k_l, v_l, None)),
        err(lambda: magi_attn_varlen_dispatch(x, cu, cu, chunk_size=4, cp_mesh=mesh3)),
        err(lambda: magi_attn_varlen_dispatch(x, cu, cu, chunk_size=4, cp_group=mesh3)),
    ]
    dist.barrier()
    return out


def test_a_cp_sub_mesh_of_a_dp_x_cp_mesh_is_its_group_everywhere(pool):
    rows = torch.arange(W).reshape(DP, CP)
    for rank, res in enumerate(pool.run(_mesh_cases, W)):
        row = tuple(rows[rank // CP].tolist())
        assert res["ranks"] == row and res["module_ranks"] == row, (rank, res["ranks"])
        assert res["same_plan"]
        assert res["rank"] == (rank % CP, CP)
        assert max(res["errs"]) < TOL, (rank, res["errs"])
        assert res["seed_equal"]
        c = rank % CP
        assert res["ring"] == (c, CP, (c + 1) % CP, (c - 1) % CP)
        assert res["magi_ranks"] == [row] * 3 and all(res["magi_round_trip"])
        assert res["magi_equal"] and res["magi_resolve"] == (CP, None)
        plan2d, plan3d, module2d, ring2d, seed2d, magi3d, magi3d_group = res["errors"]
        assert plan2d.startswith("group: expected a 1-d DeviceMesh or a 2-d one with a dim "
                                 "named ulysses or heads")  # fmt: skip
        assert "(4, 4)" in plan2d and "('dp', 'cp')" in plan2d and "mesh['cp']" in plan2d
        assert plan3d.startswith("group: expected a 1-d DeviceMesh") and "3-d" in plan3d
        assert module2d == plan2d
        assert ring2d.startswith("process_group: expected a 1-d DeviceMesh, got a 2-d")
        assert seed2d == ring2d
        assert magi3d.startswith("cp_mesh: expected a 1-d DeviceMesh or a 2-d one (inter")
        assert magi3d_group.startswith("cp_group: expected a 1-d DeviceMesh or a 2-d one")
