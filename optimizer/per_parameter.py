"""One optimizer per parameter behind the face of one: the fused backward pass and stochastic rounding.

**The fused backward pass** (PyTorch's tutorial "How to save memory by fusing the optimizer step into the backward
pass"): each parameter is updated as soon as its gradient is complete, from a hook torch runs after the gradient
is accumulated (`Tensor.register_post_accumulate_grad_hook`), and its gradient is freed there. The whole model's
gradients never exist at once: the largest of them is the most held at any time, where an ordinary step holds
one buffer the size of the trained weights (3.2 GiB for SD 1.5's UNet in fp32) until `step()`. Each parameter
needs an optimizer of its own for that, and the update is the one of the unfused optimizer only when an
optimizer's update of a parameter depends on that parameter alone (AdamW, Lion, their 8-bit versions, Adafactor;
not Prodigy or D-Adaptation, whose step estimates span all parameters). What needs every gradient before the
first update cannot work: clipping the global gradient norm, and accumulating gradients over micro-batches
(their buffer is the memory this saves); utils/config.py refuses both.

**Stochastic rounding** of bf16 weights: each parameter's update is computed on an fp32 copy of it and rounded back
to bf16 stochastically (optimizer/stochastic_rounding.py). Stepping one parameter at a time keeps that copy to one
parameter's size.

To the rest of the trainer `PerParameterOptimizer` is one torch optimizer with the model-level param groups
(UNet, text encoder): the LR scheduler sets each group's `lr` and betas there (FunctionLR is unchanged), and every
parameter's own optimizer takes its group's current values just before it steps. `state_dict()` has exactly the
layout of the single optimizer it stands for (parameters numbered in group order), plus the rounding's counts, so
resuming is exact and a state moves between fused and unfused runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from optimizer.stochastic_rounding import StochasticRounding, fp32_working_copy

# The state_dict key of the stochastic rounding's state (a plain torch optimizer ignores it).
ROUNDING_KEY = "stochastic_rounding"


class PerParameterOptimizer(torch.optim.Optimizer):
    """`make_optimizer(groups)` builds the wrapped optimizer class (the factory's class with its arguments) over
    one parameter. With `fused_backward`, parameters are stepped by hooks during the backward and their gradients
    freed; otherwise by `step()`. With `rounding`, bf16 parameters are stepped in fp32 and rounded stochastically.
    Groups must be non-empty (optimizer/optimizers.py leaves out the models that do not train)."""

    def __init__(
        self,
        param_groups: list[dict],
        make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
        fused_backward: bool = False,
        rounding: StochasticRounding | None = None,
    ) -> None:
        self.rounding = rounding
        self._optimizers: dict[torch.Tensor, torch.optim.Optimizer] = {}
        groups = []
        for group in param_groups:
            settings = hyperparameters(group)
            for param in group["params"]:
                self._optimizers[param] = make_optimizer([{**settings, "params": [param]}])
            # The wrapped optimizer's defaults complete the group (amsgrad, foreach, Adafactor's clip_threshold ...),
            # so that the groups, and the state_dict, are those of the one optimizer this stands for.
            first = self._optimizers[group["params"][0]].param_groups[0]
            groups.append({**hyperparameters(first), "params": list(group["params"])})
        super().__init__(groups, defaults={})
        self._group_index = {param: index for index, group in enumerate(self.param_groups) for param in group["params"]}
        # Parameters numbered in group order, as in state_dict(): the stochastic rounding of each is keyed by it.
        self._number = {param: number for number, param in enumerate(self._group_index)}
        if fused_backward:  # the hooks live as long as the parameters; nothing here ever removes them
            for param in self._group_index:
                param.register_post_accumulate_grad_hook(self._step_in_backward)

    @torch.no_grad()
    def step(self, closure=None):
        """Step every parameter that holds a gradient. In the fused pass none is left: the hooks stepped each one
        during the backward and freed its gradient, so this only steps a gradient made outside a backward."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for param, index in self._group_index.items():
            if param.grad is not None:
                self._step_parameter(param, self.param_groups[index])
        return loss

    def _step_in_backward(self, param: torch.Tensor) -> None:
        """The post-accumulate-grad hook: the gradient is complete (torch runs the hook once per backward, after every
        use of the parameter contributed), so the parameter steps now and its gradient goes."""
        self._step_parameter(param, self.param_groups[self._group_index[param]])
        param.grad = None

    def _step_parameter(self, param: torch.Tensor, group: dict) -> None:
        optimizer = self._optimizers[param]
        # The group's current LR and betas: the LR scheduler sets them on the model-level groups (ours).
        optimizer.param_groups[0].update(hyperparameters(group))
        if self.rounding is not None and param.dtype == torch.bfloat16:
            with fp32_working_copy(param) as stored:
                optimizer.step()
                self.rounding.round_into(stored, param.data, self._number[param])
        else:
            optimizer.step()

    def state_dict(self) -> dict:
        """The single optimizer's layout: {"state": {index: state}, "param_groups": [{..., "params": [indices]}]}."""
        state, groups, index = {}, [], 0
        for group in self.param_groups:
            indices = []
            for param in group["params"]:
                own = self._optimizers[param].state_dict()["state"]
                if 0 in own:
                    state[index] = own[0]
                indices.append(index)
                index += 1
            groups.append({**hyperparameters(group), "params": indices})
        saved = {"state": state, "param_groups": groups}
        if self.rounding is not None:
            saved[ROUNDING_KEY] = self.rounding.state_dict()
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """A state_dict of this class or of the single optimizer it stands for. The groups keep their dicts (the
        hooks and the LR scheduler hold on to them by position); their values are the saved ones, as torch does."""
        saved_groups = state_dict["param_groups"]
        if [len(group["params"]) for group in saved_groups] != [len(group["params"]) for group in self.param_groups]:
            raise ValueError(
                "the saved optimizer state has other parameter groups (their number or sizes differ) than this "
                "optimizer's"
            )
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            group.update(hyperparameters(saved))
            for param, saved_id in zip(group["params"], saved["params"], strict=True):
                own = state_dict["state"].get(saved_id)
                self._load_parameter_state(param, {**hyperparameters(saved), "params": [0]}, own)
        if self.rounding is not None and ROUNDING_KEY in state_dict:
            self.rounding.load_state_dict(state_dict[ROUNDING_KEY])

    def _load_parameter_state(self, param: torch.Tensor, group: dict, state: dict | None) -> None:
        own = {"state": {0: state} if state is not None else {}, "param_groups": [group]}
        optimizer = self._optimizers[param]
        if self.rounding is not None and param.dtype == torch.bfloat16:
            # torch casts a loaded state to its parameter's dtype: loaded against the fp32 working copy, the fp32
            # state stays fp32 (as it was computed), not rounded to bf16.
            with fp32_working_copy(param):
                optimizer.load_state_dict(own)
        else:
            optimizer.load_state_dict(own)


def hyperparameters(group: dict) -> dict:
    """A param group's settings: everything but its parameters."""
    return {key: value for key, value in group.items() if key != "params"}
