"""CUDA-graph replay wrapper (its checks and its eager path off CUDA), the transfer head
start, and pieces received into one buffer (read as one view, not concatenated).

The replay itself needs a GPU: ``benchmarks/gpu_graphs_check.py`` checks it there, bit
for bit against eager, for one device and for context parallel over NCCL."""

import pytest
import torch

import hamilton_attn as ha
from hamilton_attn import config
from hamilton_attn.runtime import comm
from hamilton_attn.runtime.pieces import _adjacent
from hamilton_attn.testing import GlooPool


def test_cuda_graph_off_cuda_runs_eagerly_with_the_same_results():
    m = ha.Mask.varlen([0, 5, 17, 40], causal=True)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 40, 2, 8, generator=gen) for _ in range(3))
    g = ha.cuda_graph(lambda a, b, c: ha.attention(a, b, c, m, return_lse=True))
    out, lse = g(q, k, v)
    ref_out, ref_lse = ha.attention(q, k, v, m, return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert g.num_graphs == 0  # nothing recorded off CUDA
    q2 = torch.randn(1, 40, 2, 8, generator=gen)
    assert torch.equal(g(q2, k, v)[0], ha.attention(q2, k, v, m))


def test_cuda_graph_refuses_bad_arguments():
    f = ha.cuda_graph(lambda x: x * 2)
    with pytest.raises(ValueError, match="args: expected at least one tensor"):
        f(3)
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(ValueError, match="forward only"):
        f(x)
    with torch.no_grad():
        assert torch.equal(f(x), x.detach() * 2)
    with pytest.raises(ValueError, match="fn: expected a callable"):
        ha.cuda_graph(3)
    with pytest.raises(ValueError, match="warmup"):
        ha.cuda_graph(lambda x: x, warmup=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_static_inputs_refuse_other_tensors():
    f = ha.cuda_graph(lambda x: x * 2, static_inputs=True)
    x = torch.randn(16, device="cuda")
    assert torch.equal(f(x), x * 2)
    x.copy_(torch.randn(16))
    assert torch.equal(f(x), x * 2)
    with pytest.raises(ValueError, match=r"args\[0\]: with static_inputs=True"):
        f(x.clone())


def test_head_start_spins_the_stream_for_the_configured_time(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "_sleep", calls.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setitem(comm._CYCLES_PER_US, 0, 1500.0)  # a 1.5 GHz clock
    with config.override(transfer_head_start_us=5.0):
        comm._head_start(torch.device("cuda", 0))
    with config.override(transfer_head_start_us=0.0):
        comm._head_start(torch.device("cuda", 0))  # 0 turns it off
    assert calls == [7500]


def _cpu_transfer_with_head_start(ctx):
    def boom(*a):
        raise AssertionError("torch.cuda._sleep called for a CPU transfer")

    torch.cuda._sleep = boom
    x = torch.full((4,), float(ctx.rank))
    y = torch.empty(4)
    with config.override(transfer_head_start_us=5.0):
        comm.start_p2p([(x, 1 - ctx.rank)], [(y, 1 - ctx.rank)], ctx.group, (0, 1)).wait()
    return y.tolist()


def test_head_start_leaves_cpu_transfers_alone():
    with GlooPool(2) as pool:
        got = pool.run(_cpu_transfer_with_head_start, 2)
    assert got == [[1.0] * 4, [0.0] * 4]


def test_adjacent_views_replace_concatenation():
    buf = torch.randn(1, 10, 2, 3)
    a, b, c = buf[:, 0:3], buf[:, 3:7], buf[:, 7:10]
    joined = _adjacent([a, b, c])
    assert joined is not None and torch.equal(joined, torch.cat([a, b, c], dim=1))
    assert joined.data_ptr() == buf.data_ptr()  # a view, no copy
    assert _adjacent([a, c]) is None  # a gap
    assert _adjacent([b, a]) is None  # out of order
    assert _adjacent([a, torch.randn(1, 4, 2, 3)]) is None  # another buffer
    batch2 = torch.randn(2, 10, 2, 3)
    assert _adjacent([batch2[:, :3], batch2[:, 3:]]) is None  # B > 1: not contiguous


def test_message_runs_join_consecutive_own_pieces():
    """groupcast with balanced_zigzag cuts a rank's shard into many pieces; those a
    rank sends to one peer in one step, back to back in its shard, go as one message.
    Both ends cut the same runs; batches above 1 keep one message per piece."""
    from hamilton_attn.runtime.pieces import _message_runs

    p = ha.plan(
        ha.Mask.causal(4096), ha.SimulatedGroup(2), schedule="groupcast", dispatch="balanced_zigzag"
    )
    parts = p.schedule.parts
    joined = 0
    for step in p.schedule.forward_steps():
        ts = list(step.transfers)
        if not ts:
            continue
        runs = _message_runs(p, ts, 1)
        assert sorted(map(repr, (t for run in runs for t in run))) == sorted(map(repr, ts))
        for run in runs:
            assert len({(t.src, t.dst) for t in run}) == 1
            for a, b in zip(run, run[1:]):
                assert a.piece.owner == b.piece.owner == a.src and b.piece.part == a.piece.part + 1
                assert parts[a.piece.part][-1][1] == parts[b.piece.part][0][0]
        joined += len(ts) - len(runs)
        assert all(len(run) == 1 for run in _message_runs(p, ts, 2))
        # each end of a pair cuts the same runs: the sender from the transfers it
        # sends, the receiver from those it receives
        for src, dst in {(t.src, t.dst) for t in ts}:
            sent = _message_runs(p, [t for t in ts if t.src == src], 1)
            got = _message_runs(p, [t for t in ts if t.dst == dst], 1)
            pair = lambda rs: [r for r in rs if (r[0].src, r[0].dst) == (src, dst)]  # noqa: B023,E731
            assert pair(sent) == pair(got) and pair(sent)
    assert joined > 0


def test_adjacent_refuses_one_token_slices_of_packed_kv():
    """A one-token piece of a packed KV tensor passes is_contiguous() whatever its row
    stride; joining such pieces must not yield a strided view (a send would refuse it)."""
    k = torch.randn(1, 8, 2, 2, 4)[:, :, 0]  # K of a packed [B, S, 2, H, D] tensor
    pieces = [k[:, i : i + 1].contiguous() for i in range(3)]
    assert _adjacent(pieces) is None


def _packed_kv_one_token_pieces(ctx):
    m = ha.Mask.causal(8)
    p = ha.plan(m, ctx.group, schedule="groupcast", dispatch="minheap", chunk_size=1)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    ref = ha.attention(q, k, v, m)
    ql, kl, vl = (ha.dispatch(t, p) for t in (q, k, v))
    kv = torch.stack([kl, vl], dim=2)  # K and V as strided views of one packed tensor
    out = ha.calc_attn(ql, kv[:, :, 0], kv[:, :, 1], p)
    return (out - ha.dispatch(ref, p)).abs().max().item()


def test_packed_kv_with_one_token_pieces_is_exact():
    with GlooPool(2) as pool:
        assert max(pool.run(_packed_kv_one_token_pieces, 2)) < 1e-12


def test_graph_signature_keys_values_by_value_and_refuses_nested_tensors():
    from hamilton_attn.runtime.graphs import _signature

    x = torch.randn(2, 3)
    plan_like = object()
    assert _signature((x, 0.5, "a", None)) == _signature((torch.randn(2, 3), 0.5, "a", None))
    assert _signature((x, 0.5)) != _signature((x, 0.25))
    assert _signature((x, plan_like)) != _signature((x, object()))
    assert _signature((x,)) != _signature((x.t(),))  # strides count
    with pytest.raises(ValueError, match=r"args\[1\]: tensors inside a list"):
        _signature((x, [x]))
    f = ha.cuda_graph(lambda a, b: a + b[0])
    with pytest.raises(ValueError, match="tensors inside a tuple"):
        f(x, (x,))  # refused off CUDA too, as on it
    with pytest.raises(ValueError, match="max_graphs"):
        ha.cuda_graph(lambda a: a, max_graphs=0)
    g = ha.cuda_graph(lambda a: a)
    g.reset()
    assert g.num_graphs == 0


def _groupcast_docs(ctx):
    """groupcast on packed documents: a step computes several pieces received together;
    result and gradients against the one-device reference (float64)."""
    cu = [0, 37, 40, 90, 141, 160, 256]
    m = ha.Mask.varlen(cu, causal=True)
    p = ha.plan(m, ctx.group, schedule="groupcast", dispatch="minheap", chunk_size=8)
    gen = torch.Generator().manual_seed(11)
    q, k, v, g = (torch.randn(1, 256, 2, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = ha.attention(*ref, m)
    ref_out.backward(g)
    local = [ha.dispatch(t, p).requires_grad_() for t in (q, k, v)]
    out = ha.calc_attn(*local, p)
    out.backward(ha.dispatch(g, p))
    errs = [(out - ha.dispatch(ref_out.detach(), p)).abs().max().item()]
    errs += [(x.grad - ha.dispatch(r.grad, p)).abs().max().item() for x, r in zip(local, ref)]
    multi = sum(
        1
        for st in p.schedule.forward_steps()
        if len([t for t in st.transfers if t.dst == ctx.rank]) > 1
    )
    return errs, multi


def test_pieces_received_together_are_exact():
    with GlooPool(4) as pool:
        res = pool.run(_groupcast_docs, 4)
    assert any(multi for _, multi in res)  # some step receives several pieces at once
    for errs, _ in res:
        assert max(errs) < 1e-10, errs
