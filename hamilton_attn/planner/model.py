"""The cost model's inputs (attention shapes, a device's rates) and outputs (per-step
costs, a prediction), and the memory a device holds (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass, field

# -- inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """Attention shapes. ``kv_heads`` None means equal to ``heads`` (no GQA)."""

    batch: int = 1
    heads: int = 32
    kv_heads: int | None = None
    head_dim: int = 128
    dtype_bytes: int = 2  # bf16

    @property
    def kvh(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token, all heads, in the input dtype."""
        return 2 * self.batch * self.kvh * self.head_dim * self.dtype_bytes

    @property
    def grad_bytes_per_token(self) -> int:
        """dK and dV accumulators of one token (float32)."""
        return 2 * self.batch * self.kvh * self.head_dim * 4

    @property
    def flops_per_pair(self) -> int:
        """Forward flops of one visible (query, key) pair: QK^T and PV, 2 flops each."""
        return 4 * self.batch * self.heads * self.head_dim

    @property
    def row_elems(self) -> int:
        """Output elements of one query row (what a merge reads and writes)."""
        return self.batch * self.heads * self.head_dim


@dataclass(frozen=True)
class DeviceModel:
    """Per-device compute rates. Defaults: one H200, cuDNN SDPA, bf16 (GPU_FACTS.md)."""

    name: str = "H200 cuDNN"
    #: forward TF/s on a dense block (cuDNN, 32K full: 619; 8K full: 678).
    fwd_tflops_full: float = 620.0
    #: forward TF/s on a block with a masked part (cuDNN, 32K causal: 595).
    fwd_tflops_masked: float = 595.0
    #: backward TF/s counted as 2.5x the forward flops (32K full 550, causal 545).
    bwd_tflops_full: float = 550.0
    bwd_tflops_masked: float = 545.0
    #: forward / backward TF/s of a step that joins several pieces into one kernel call
    #: (``Plan.fused_block``: a staircase of rectangles for causal zigzag, documents cut
    #: across owners), as the executor runs it (one kernel call per step; on ``auto``
    #: the sdpa backend's per-piece cuDNN calls): each band of the block (one rectangle
    #: of a piece's mask, one cuDNN call) runs at ``fused * n / (n + half)``, n its rows,
    #: and the step at the area-weighted harmonic mean (:func:`fused_rates`).
    #: Fitted (least squares on log rates, ``benchmarks/fit_fused_rates.py``,
    #: results/fused_rates_fit_2026-12-04.md) to the
    #: fused blocks of the twelve W = 8 steps of ``hamilton``, ``direct`` and
    #: ``groupcast`` that ``benchmarks/gpu_triton.py`` timed on one H200
    #: (results/triton_H200_2026-12-04_s9.md: causal zigzag and long-tailed documents,
    #: 8K and 32K tokens per rank, auto's per-piece cuDNN 438-634 TF/s forward): rms
    #: error 7.5% forward, 7.3% backward, against 12% / 16% for one constant rate. The
    #: backward's rate is the backward alone (2.5x the forward's flops).
    fwd_tflops_fused: float = 655.0
    bwd_tflops_fused: float = 573.0
    fused_rows_half_fwd: float = 830.0
    fused_rows_half_bwd: float = 1280.0
    #: eager merge of two partials: 16K x 32 x 128 in 0.685 ms -> 9.8e10 elements/s.
    merge_elems_per_s: float = 9.8e10
    #: backward fp32 dQ/dK/dV accumulation per block, fitted to the 2 x H200 ring trace
    #: (benchmarks/results/trace_ring_H200x2_2026-11-22_summary.txt: ~1.45 ms per 16K-row block).
    bwd_block_elems_per_s: float = 4.6e10
    #: fixed cost per block (kernel launches, slicing).
    block_overhead_s: float = 20e-6
    #: device memory (H200: 141 GB).
    memory_bytes: float = 141e9
    #: backward flops / forward flops (the usual FlashAttention count).
    bwd_flops_factor: float = 2.5


@dataclass(frozen=True)
class BlockStat:
    """One (rank, piece) block: visible pairs and its bounding box (rows x cols)."""

    area: int
    rows: int
    cols: int
    #: ``(area, rows)`` of each band (one rectangle of the mask: one kernel call of a
    #: per-piece backend); empty: the block is one band.
    bands: tuple = ()

    @property
    def dense(self) -> bool:
        return self.area == self.rows * self.cols


EMPTY = BlockStat(0, 0, 0)


def fused_rates(dev: DeviceModel, bands) -> tuple[float, float]:
    """Forward and backward TF/s of one call joining ``bands`` (``(area, rows)`` each):
    each at ``fused * rows / (rows + half)`` (:class:`DeviceModel`), the call at their
    area-weighted harmonic mean."""
    total = sum(a for a, _ in bands)
    if total <= 0:
        return dev.fwd_tflops_fused, dev.bwd_tflops_fused
    out = []
    for rate, half in ((dev.fwd_tflops_fused, dev.fused_rows_half_fwd),
                       (dev.bwd_tflops_fused, dev.fused_rows_half_bwd)):  # fmt: skip
        t = sum(a * (n + half) / (rate * n) for a, n in bands if a > 0 and n > 0)
        out.append(total / t if t > 0 else rate)
    return out[0], out[1]


# -- outputs --------------------------------------------------------------------------


@dataclass
class StepCost:
    """One step: forward and backward compute / transfer / overlapped time (s)."""

    compute_s: float
    transfer_s: float
    bwd_compute_s: float
    bwd_transfer_s: float
    max_link_bytes: float  # forward KV bytes on the busiest resource in this step
    forward: bool = True  # False: a backward-only step (trailing grads)
    repeat: int = 1  # identical consecutive steps folded into one (fast path)
    kernel_s: float = 0.0  # the attention kernels alone (compute_s less merges, overheads)

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.transfer_s) if self.forward else 0.0

    @property
    def bwd_time_s(self) -> float:
        return max(self.bwd_compute_s, self.bwd_transfer_s)


@dataclass
class Prediction:
    """What :func:`simulate` predicts for one schedule on one cluster."""

    schedule: str
    topology: str
    world_size: int
    seqlen: int
    mask: str
    steps: list[StepCost]
    link_bytes: dict[str, float]  # resource name -> forward KV bytes over the whole pass
    peak_mem_bytes: float  # per device, forward
    exact: bool  # built and verified the schedule (True) or closed form (False)
    notes: str = ""
    meta: dict = field(default_factory=dict)
    #: The exact path's per-rank timelines (:func:`.cost.drift_total`): forward and
    #: backward pass times, and the largest forward compute of one rank. None: ranks in
    #: lock step (each step the slowest rank's compute or its transfers), the closed
    #: form's model (its schedules are symmetric).
    drift: tuple[float, float, float] | None = None

    @property
    def fwd_s(self) -> float:
        if self.drift is not None:
            return self.drift[0]
        return sum(s.time_s * s.repeat for s in self.steps)

    @property
    def bwd_s(self) -> float:
        if self.drift is not None:
            return self.drift[1]
        return sum(s.bwd_time_s * s.repeat for s in self.steps)

    @property
    def lockstep_fwd_s(self) -> float:
        """The forward with ranks in lock step (an upper bound of :attr:`fwd_s`)."""
        return sum(s.time_s * s.repeat for s in self.steps)

    @property
    def fwd_bwd_s(self) -> float:
        return self.fwd_s + self.bwd_s

    @property
    def num_steps(self) -> int:
        return sum(s.repeat for s in self.steps)

    @property
    def compute_s(self) -> float:
        """Forward compute on the critical path: the busiest rank's (per-rank
        timelines), or the sum of each step's slowest rank (lock step)."""
        if self.drift is not None:
            return self.drift[2]
        return sum(s.compute_s * s.repeat for s in self.steps if s.forward)

    @property
    def transfer_s(self) -> float:
        """Forward transfer time, each step's slowest (a lock-step sum)."""
        return sum(s.transfer_s * s.repeat for s in self.steps if s.forward)

    @property
    def exposed_s(self) -> float:
        """Forward time not hidden behind compute."""
        return self.fwd_s - self.compute_s

    @property
    def kernel_s(self) -> float:
        """Forward attention-kernel time alone (no merges, no per-block overheads), each
        step's slowest rank (a lock-step sum: it can exceed :attr:`compute_s`, the
        busiest rank's own total, where steps give ranks unequal work)."""
        return sum(s.kernel_s * s.repeat for s in self.steps if s.forward)

    @property
    def kernel_exposed_s(self) -> float:
        """Forward transfer time not hidden behind the attention kernels alone, per step
        in lock step."""
        return sum(
            (max(s.kernel_s, s.transfer_s) - s.kernel_s) * s.repeat for s in self.steps if s.forward
        )

    @property
    def max_step_transfer_s(self) -> float:
        return max((s.transfer_s for s in self.steps if s.forward), default=0.0)

    @property
    def busiest_link_bytes(self) -> float:
        return max(self.link_bytes.values(), default=0.0)

    @property
    def busiest_link(self) -> str:
        return max(self.link_bytes, key=self.link_bytes.get) if self.link_bytes else "-"

    def row(self) -> dict:
        return {
            "schedule": self.schedule,
            "topology": self.topology,
            "W": self.world_size,
            "seqlen": self.seqlen,
            "fwd_ms": self.fwd_s * 1e3,
            "fwd_bwd_ms": self.fwd_bwd_s * 1e3,
            "busiest_link_GB": self.busiest_link_bytes / 1e9,
            "peak_mem_GB": self.peak_mem_bytes / 1e9,
            "exact": self.exact,
        }


def memory_per_device(local_len: int, shapes: Shapes, peak_kv_tokens: float) -> float:
    """Forward bytes per device: local q, k, v, out (dtype), lse and the fp32 output
    accumulator, plus ``peak_kv_tokens`` of received KV."""
    b, h, d, db = shapes.batch, shapes.heads, shapes.head_dim, shapes.dtype_bytes
    q_out = 2 * local_len * b * h * d * db
    kv = local_len * shapes.kv_bytes_per_token
    lse = local_len * b * h * 4
    acc = local_len * b * h * (d + 1) * 4
    return q_out + kv + lse + acc + peak_kv_tokens * shapes.kv_bytes_per_token
