"""bf16 weights without fp32 master copies: the update is computed in fp32 and rounded to bf16 stochastically.

A bf16 weight has 8 significant bits, so an update smaller than half its spacing (1e-4 on a weight of 0.05,
whose spacing is 2.4e-4) is lost entirely by round-to-nearest, every step: the weights stop learning at the
LRs fine-tuning uses. Stochastic rounding rounds up with a probability equal to the fraction of the spacing the
exact value has covered, so the rounded weight is right on average (E[round(x)] = x) and small updates add up
over the steps instead of vanishing.

The rounding adds 16 random bits to the fp32 value's 16 low bits (the ones bf16 drops) and truncates: the carry
into bit 16 happens with probability (low bits) / 2**16. fp32 and bf16 share the sign and exponent layout, so
this is exact for both signs (sign-magnitude: the carry moves away from zero as the truncation moves toward it),
for subnormals, and it carries into infinity only from above bf16's largest finite value.

The random bits come from a generator of this module's own (not the global one the noise draws come from),
seeded afresh for each rounding from (the run's seed, the parameter, how many times it was rounded before):
counter-based, so the bits a parameter gets do not depend on the order the parameters step in (the fused backward
pass steps them in the backward's order, an ordinary step in the groups' order: both train bit-equal), every
process rounds alike, and the state to save for an exact resume is one count per parameter."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

LOW_BITS = 16  # fp32's mantissa bits that bf16 does not keep
KEEP_HIGH_BITS = -(1 << LOW_BITS)  # as int32: 0xFFFF0000


def round_to_bf16_stochastically(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`value` (fp32) rounded to bf16, up or down with the probabilities that make the result unbiased. NaN stays
    NaN (the bit arithmetic could turn some NaN payloads into other values)."""
    if value.dtype != torch.float32:
        raise TypeError(f"stochastic rounding takes an fp32 tensor, got {value.dtype}")
    bits = torch.randint(0, 1 << LOW_BITS, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    bits.add_(value.view(torch.int32)).bitwise_and_(KEEP_HIGH_BITS)
    rounded = bits.view(torch.float32)  # the low 16 bits are zero: the conversion to bf16 below is exact
    return torch.where(value.isnan(), value, rounded).to(torch.bfloat16)


def rounding_seed(run_seed: int, parameter: int, rounds: int) -> int:
    """The seed of one rounding: a hash of the run's seed, the parameter's number and its count of roundings, so
    that no two roundings share random bits and none shares a stream with the global generator's noise."""
    digest = hashlib.sha256(f"everycycle stochastic rounding {run_seed} {parameter} {rounds}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds are at most 64 bits; keep it positive


class StochasticRounding:
    """Rounds fp32 results into the bf16 weights of `parameters` numbered parameters, on the weights' device."""

    def __init__(self, run_seed: int, device: torch.device, parameters: int) -> None:
        self.run_seed = run_seed
        self.generator = torch.Generator(device=device)
        self.rounds = [0] * parameters  # how many times each parameter was rounded: its next seed

    def round_into(self, target: torch.Tensor, value: torch.Tensor, parameter: int) -> None:
        """Write `value` (fp32) into the bf16 tensor `target`, the weight of parameter number `parameter`, rounded
        stochastically."""
        self.generator.manual_seed(rounding_seed(self.run_seed, parameter, self.rounds[parameter]))
        self.rounds[parameter] += 1
        target.copy_(round_to_bf16_stochastically(value, self.generator))

    def state_dict(self) -> dict:
        return {"rounds": list(self.rounds)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["rounds"]) != len(self.rounds):
            raise ValueError(
                f"the saved stochastic rounding state counts {len(state['rounds'])} parameters, this optimizer has "
                f"{len(self.rounds)}"
            )
        self.rounds = [int(count) for count in state["rounds"]]


@contextmanager
def fp32_working_copy(param: torch.nn.Parameter) -> Iterator[torch.Tensor]:
    """Inside, `param` holds an fp32 copy of its bf16 value and gradient, so that an optimizer computes on (and keeps
    its state in) fp32; yields the bf16 storage, which is put back on leaving whatever happened inside. Only one
    parameter's copy exists at a time, so the extra memory is that of the largest parameter, not of the model."""
    stored, grad = param.data, param.grad
    param.grad = None  # a gradient must have its parameter's dtype: it is swapped after the value
    param.data = stored.float()
    if grad is not None:
        param.grad = grad.float()
    try:
        yield stored
    finally:
        param.grad = None
        param.data = stored
        param.grad = grad
