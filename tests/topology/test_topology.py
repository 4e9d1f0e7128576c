"""Property tests for ``hamilton_attn.topology`` and the seed-named graph functions built on
it in ``hamilton_attn.compat.hamilton`` (pure Python, fast).

The checks here are written independently of the library's own ``verify_*``
helpers, so a bug shared by a construction and its verifier still shows up.
"""

from __future__ import annotations

import ast
import pathlib
import time

import pytest

from hamilton_attn import topology
from hamilton_attn.compat.hamilton import (
    calculate_in_mapping_circle,
    calculate_inter_node_mapping,
    calculate_intra_node_in_mapping_two_nodes,
    calculate_intra_node_out_mapping_two_nodes,
    calculate_out_mapping_circle,
    calculate_source_rank_per_iter,
    gen_hamilton_circle,
    gen_hamilton_circle_two_nodes,
    gen_hamilton_path_local,
)
from hamilton_attn.compat.hamilton.causal import source_rank_per_iter
from hamilton_attn.topology import (
    complete_graph,
    hamiltonian_decomposition,
    has_decomposition,
    inter_node_arcs,
    two_level_cycles,
    verify_decomposition,
    verify_two_level,
    walecki_cycles,
    walecki_paths,
)

VALID_N = [n for n in range(2, 65) if n not in (4, 6)]


# --------------------------------------------------------------------------- #
# independent checkers
# --------------------------------------------------------------------------- #


def cycle_arcs(cycle):
    return [(cycle[i], cycle[(i + 1) % len(cycle)]) for i in range(len(cycle))]


def assert_hamiltonian_decomposition(cycles, n):
    assert len(cycles) == n - 1
    arcs = []
    for cyc in cycles:
        assert sorted(cyc) == list(range(n)), "a cycle must visit every vertex exactly once"
        assert cyc[0] == 0, "cycles start at vertex 0"
        arcs.extend(cycle_arcs(cyc))
    assert len(arcs) == len(set(arcs)), "cycles must be arc-disjoint"
    assert set(arcs) == {(u, v) for u in range(n) for v in range(n) if u != v}


# --------------------------------------------------------------------------- #
# complete graph
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("n", VALID_N)
def test_decomposition_is_hamiltonian_arc_disjoint_and_covering(n):
    assert has_decomposition(n)
    assert_hamiltonian_decomposition(hamiltonian_decomposition(n), n)


def test_n2_is_single_cycle():
    assert hamiltonian_decomposition(2) == [[0, 1]]


@pytest.mark.parametrize("n", [4, 6])
def test_no_decomposition_for_4_and_6(n):
    assert not has_decomposition(n)
    with pytest.raises(ValueError) as info:
        hamiltonian_decomposition(n)
    msg = str(info.value)
    assert "no decomposition" in msg
    assert "direct" in msg


@pytest.mark.parametrize("n", [-3, 0, 1])
def test_too_small_n_raises(n):
    assert not has_decomposition(n)
    with pytest.raises(ValueError):
        hamiltonian_decomposition(n)


def test_build_time_under_one_second_each():
    complete_graph._decomposition_cached.cache_clear()
    slow = {}
    for n in VALID_N:
        t0 = time.perf_counter()
        hamiltonian_decomposition(n)
        dt = time.perf_counter() - t0
        if dt >= 1.0:
            slow[n] = dt
    assert not slow, f"building took >= 1 s for {slow}"


def test_deterministic_and_returns_fresh_lists():
    first = hamiltonian_decomposition(10)
    first[0][1] = -1  # must not poison the cache
    complete_graph._decomposition_cached.cache_clear()
    again = hamiltonian_decomposition(10)
    assert again == hamiltonian_decomposition(10)
    assert_hamiltonian_decomposition(again, 10)
    # Same result after recomputation (every rank must derive the same schedule).
    recomputed = [list(c) for c in complete_graph._decomposition_cached.__wrapped__(10)]
    assert recomputed == again


def test_verify_decomposition_rejects_broken_input():
    good = hamiltonian_decomposition(8)
    verify_decomposition(good, 8)
    with pytest.raises(ValueError, match="expected 7 cycles"):
        verify_decomposition(good[:-1], 8)
    swapped = [c[:] for c in good]
    swapped[0][1], swapped[0][2] = swapped[0][2], swapped[0][1]
    with pytest.raises(ValueError, match="used by cycles"):
        verify_decomposition(swapped, 8)
    repeated = [c[:] for c in good]
    repeated[1][3] = repeated[1][4]
    with pytest.raises(ValueError, match="twice"):
        verify_decomposition(repeated, 8)
    with pytest.raises(ValueError, match="not a vertex"):
        verify_decomposition([[0, 1, 2, 3, 4, 5, 6, 9]] + good[1:], 8)


@pytest.mark.parametrize("n", [3, 5, 7, 9, 21, 63])
def test_walecki_cycles_cover_undirected_kn(n):
    cycles = walecki_cycles(n)
    assert len(cycles) == (n - 1) // 2
    edges = []
    for cyc in cycles:
        assert sorted(cyc) == list(range(n))
        edges.extend(frozenset(a) for a in cycle_arcs(cyc))
    assert len(edges) == len(set(edges)) == n * (n - 1) // 2


@pytest.mark.parametrize("m", list(range(2, 65, 2)))
def test_walecki_paths_cover_every_arc_once(m):
    paths = walecki_paths(m)
    assert len(paths) == m
    arcs = []
    for p in paths:
        assert sorted(p) == list(range(m))
        arcs.extend(zip(p, p[1:]))
    assert len(arcs) == len(set(arcs)) == m * (m - 1)
    # every vertex starts exactly one path and ends exactly one path
    assert sorted(p[0] for p in paths) == list(range(m))
    assert sorted(p[-1] for p in paths) == list(range(m))


@pytest.mark.parametrize("m", [0, 1, 3, 7])
def test_walecki_paths_needs_even_m(m):
    with pytest.raises(ValueError):
        walecki_paths(m)


def _assert_no_torch_import(paths):
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.split(".")[0] == "torch", f"{path.name} imports {name}"


def test_topology_does_not_import_torch():
    _assert_no_torch_import(pathlib.Path(topology.__file__).parent.glob("*.py"))


def test_seed_named_graph_functions_do_not_import_torch():
    pkg = pathlib.Path(topology.__file__).parent.parent / "compat" / "hamilton"
    _assert_no_torch_import(pkg / f"{name}.py" for name in ("cycles", "mapping", "causal"))


# --------------------------------------------------------------------------- #
# two-level
# --------------------------------------------------------------------------- #

TWO_LEVEL = [(u, m) for u in range(2, 9) for m in (2, 4, 6, 8)]


@pytest.mark.parametrize("u,m", TWO_LEVEL)
def test_two_level_properties(u, m):
    n = u * m
    cycles = two_level_cycles(u, m)
    assert len(cycles) == m
    arcs = []
    for cyc in cycles:
        assert sorted(cyc) == list(range(n)), "each cycle is Hamiltonian over all devices"
        arcs.extend(cycle_arcs(cyc))
    assert len(arcs) == len(set(arcs))
    intra = [a for a in arcs if a[0] // m == a[1] // m]
    all_intra = {
        (k * m + i, k * m + j) for k in range(u) for i in range(m) for j in range(m) if i != j
    }
    assert len(intra) == len(all_intra) and set(intra) == all_intra, "intra arcs used once"
    for r in range(n):
        outs = [b for a, b in arcs if a == r]
        ins = [a for a, b in arcs if b == r]
        for peers in (outs, ins):
            same = [p for p in peers if p // m == r // m]
            other = [p for p in peers if p // m != r // m]
            assert len(same) == len(set(same)) == m - 1
            assert len(other) == 1
    inter = inter_node_arcs(cycles, m)
    assert sorted(inter) == sorted(a for a in arcs if a[0] // m != a[1] // m)
    assert len(inter) == n
    assert sorted(a for a, _ in inter) == list(range(n))
    assert sorted(b for _, b in inter) == list(range(n))


def test_two_level_joins_node_paths_in_node_order():
    u, m = 3, 4
    paths = walecki_paths(m)
    for c, cyc in enumerate(two_level_cycles(u, m)):
        for k in range(u):
            assert cyc[k * m : (k + 1) * m] == [k * m + x for x in paths[c]]


def test_verify_two_level_rejects_broken_input():
    good = two_level_cycles(2, 4)
    verify_two_level(good, 2, 4)
    with pytest.raises(ValueError, match="expected 4 cycles"):
        verify_two_level(good[:-1], 2, 4)
    dup = [c[:] for c in good]
    dup[1] = dup[0][:]
    with pytest.raises(ValueError, match="used by cycles"):
        verify_two_level(dup, 2, 4)
    # A full K*_8 decomposition uses many inter-node arcs per device.
    with pytest.raises(ValueError):
        verify_two_level(hamiltonian_decomposition(8)[:4], 2, 4)
    with pytest.raises(ValueError):
        two_level_cycles(1, 8)
    with pytest.raises(ValueError):
        two_level_cycles(2, 3)


# --------------------------------------------------------------------------- #
# seed-named API (hamilton_attn.compat.hamilton's cycles, mapping, causal: pure Python
# on the constructions above)
# --------------------------------------------------------------------------- #


def simulate_sources(looping):
    """Pass chunk tokens round the cycles; record who each rank receives from."""
    n, num_c = len(looping[0]), len(looping)
    holding = [[r] * num_c for r in range(n)]  # holding[r][c] = origin of chunk r holds on c
    result = []
    for _ in range(n - 1):
        new = [[None] * num_c for _ in range(n)]
        for c, cyc in enumerate(looping):
            for i in range(n):
                sender, receiver = cyc[i], cyc[(i + 1) % n]
                new[receiver][c] = holding[sender][c]
        holding = new
        result.append([row[:] for row in holding])
    return result


@pytest.mark.parametrize("n", [2, 3, 5, 8, 10, 16])
def test_circle_mappings(n):
    looping = gen_hamilton_circle(n)
    assert looping == hamiltonian_decomposition(n)
    out = calculate_out_mapping_circle(looping)
    inn = calculate_in_mapping_circle(looping)
    assert len(out) == len(inn) == n
    assert all(len(row) == n - 1 for row in out + inn)
    for r in range(n):
        assert sorted(out[r]) == [p for p in range(n) if p != r]
        assert sorted(inn[r]) == [p for p in range(n) if p != r]
        for c in range(n - 1):
            assert inn[out[r][c]][c] == r
            assert out[inn[r][c]][c] == r
            i = looping[c].index(r)
            assert out[r][c] == looping[c][(i + 1) % n]


@pytest.mark.parametrize(
    "looping_fn",
    [
        lambda: gen_hamilton_circle(8),
        lambda: gen_hamilton_circle(9),
        lambda: two_level_cycles(3, 4),
    ],
)
def test_source_ranks_match_simulation(looping_fn):
    looping = looping_fn()
    n, num_c = len(looping[0]), len(looping)
    src = source_rank_per_iter(looping)
    flags = calculate_source_rank_per_iter(looping)
    expected = simulate_sources(looping)
    assert len(src) == len(flags) == n - 1
    assert all(len(step) == n and all(len(row) == num_c for row in step) for step in src)
    assert src == expected
    for t in range(n - 1):
        for r in range(n):
            for c in range(num_c):
                assert isinstance(flags[t][r][c], bool)
                assert flags[t][r][c] == (expected[t][r][c] < r)
    # over the n-1 iterations every rank receives every other rank's chunk c once
    for r in range(n):
        for c in range(num_c):
            assert sorted(src[t][r][c] for t in range(n - 1)) == [p for p in range(n) if p != r]
    # t = 0 is the direct predecessor
    inn = calculate_in_mapping_circle(looping)
    assert src[0] == inn


def test_source_flags_small_example():
    looping = [[0, 1, 2]]  # one cycle 0 -> 1 -> 2 -> 0
    assert source_rank_per_iter(looping) == [[[2], [0], [1]], [[1], [2], [0]]]
    assert calculate_source_rank_per_iter(looping) == [
        [[False], [True], [True]],
        [[False], [False], [True]],
    ]


@pytest.mark.parametrize("n,m", [(16, 8), (32, 8), (12, 4), (4, 2)])
def test_two_node_mappings(n, m):
    looping = (
        gen_hamilton_circle_two_nodes(n)
        if m == 8
        else gen_hamilton_circle_two_nodes(n, node_size=m)
    )
    assert looping == two_level_cycles(n // m, m)
    path0 = gen_hamilton_path_local(m)
    assert path0 == walecki_paths(m)
    out0 = calculate_intra_node_out_mapping_two_nodes(path0)
    in0 = calculate_intra_node_in_mapping_two_nodes(path0)
    assert len(out0) == len(in0) == m and all(len(r) == m for r in out0 + in0)
    # exactly one -1 per row (device is last/first of one path) and per column (path end/start)
    for table in (out0, in0):
        assert all(row.count(-1) == 1 for row in table)
        assert all([row[c] for row in table].count(-1) == 1 for c in range(m))
    inter_out = calculate_inter_node_mapping(looping)
    inter_in = calculate_inter_node_mapping(looping, direction="in")
    assert inter_out == calculate_inter_node_mapping(looping, node_size=m)
    assert len(inter_out) == len(inter_in) == n
    succ = calculate_out_mapping_circle(looping)
    pred = calculate_in_mapping_circle(looping)
    for node in range(n // m):
        out_k = calculate_intra_node_out_mapping_two_nodes(path0, node=node)
        in_k = calculate_intra_node_in_mapping_two_nodes(path0, node=node)
        for local in range(m):
            r = node * m + local
            for c in range(m):
                # node k's table is node 0's shifted by k*m
                assert out_k[local][c] == (
                    -1 if out0[local][c] == -1 else out0[local][c] + node * m
                )
                assert in_k[local][c] == (-1 if in0[local][c] == -1 else in0[local][c] + node * m)
                # tables agree with the cycles: -1 exactly where the hop leaves the node
                if out_k[local][c] == -1:
                    assert succ[r][c] // m != node
                    assert inter_out[r] == (succ[r][c], c)
                else:
                    assert out_k[local][c] == succ[r][c]
                if in_k[local][c] == -1:
                    assert pred[r][c] // m != node
                    assert inter_in[r] == (pred[r][c], c)
                else:
                    assert in_k[local][c] == pred[r][c]
    for r, (peer, c) in enumerate(inter_out):
        assert peer // m != r // m
        assert inter_in[peer] == (r, c)


def test_two_node_argument_errors():
    with pytest.raises(ValueError):
        gen_hamilton_circle_two_nodes(12)  # not a multiple of 8
    with pytest.raises(ValueError):
        gen_hamilton_circle_two_nodes(8)  # a single node
    with pytest.raises(ValueError):
        calculate_inter_node_mapping(gen_hamilton_circle(8), node_size=4)  # many inter sends
    with pytest.raises(ValueError):
        calculate_inter_node_mapping(two_level_cycles(2, 4), direction="sideways")
