"""``hamilton-attn verify`` on CPU: it passes the backends here on fresh draws, and its
bound is tight enough to fail a backend that is slightly wrong (a sink counted twice,
ALiBi slopes 10% off, a sink gradient 10% off) in float32 and in bfloat16."""

import math

import pytest
import torch

import hamilton_attn.cli.verify as verify_mod
from hamilton_attn.variants import Softmax


def _failed_rows(table: str) -> list[str]:
    return [line.split("|")[1].strip() for line in table.splitlines() if "FAIL" in line]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_verify_passes_the_cpu_backends_on_fresh_draws(seed):
    out = []
    ok = verify_mod.run_verify(
        "cpu",
        dtypes=[torch.float32, torch.bfloat16],
        backends=["reference", "sdpa"],
        seed=seed,
        printer=out.append,
    )
    assert ok, _failed_rows(out[0])
    assert "0 failed" in out[-1]


def _broken(real, how):
    def attention(*args, variant=None, **kw):
        if isinstance(variant, Softmax):
            if how == "sink twice" and variant.sink is not None:
                variant = Softmax(sink=variant.sink + math.log(2.0))
            if how == "slopes off" and variant.alibi_slopes is not None:
                variant = Softmax(alibi_slopes=variant.alibi_slopes * 1.1)
            if how == "sink grad off" and variant.sink is not None:
                s = variant.sink
                variant = Softmax(sink=s.detach() + (s - s.detach()) * 1.1)
        return real(*args, variant=variant, **kw)

    return attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "how, variant", [("sink twice", "sink"), ("slopes off", "alibi"), ("sink grad off", "sink")]
)
def test_verify_fails_a_slightly_wrong_backend(monkeypatch, how, variant, dtype):
    monkeypatch.setattr(verify_mod, "attention", _broken(verify_mod.attention, how))
    out = []
    ok = verify_mod.run_verify(
        "cpu", dtypes=[dtype], backends=["reference"], plain=False, seed=0, printer=out.append
    )
    assert not ok
    want = [f"{m}+{variant}" for m in verify_mod.VARIANT_MASKS]
    assert _failed_rows(out[0]) == want
