"""LoRA's forward with the update added inside its own GEMM, instead of in two passes over the layer's output.

peft computes ``result + lora_B(lora_A(x)) * scaling``. The scaling multiplies, and the sum then adds, a tensor as
wide as the layer's output (1,536 columns in SmolLM2's MLP), and autograd repeats the multiply on the way back. Those
passes are memory-bound, so on a CPU they cost about as much as the rank-r GEMM itself (``scripts/profile_step.py
--shapes``). ``torch.addmm(result, h, B.T, alpha=scaling)`` accumulates the scaled update straight into the base
output, and its backward scales only rank-r gradients.

Only peft's plain ``lora.Linear`` on a dense base is swapped to the subclass below, and only where nothing else runs in
its forward: no DoRA or other variant, no LoRA bias. Anything else at call time (merged weights, disabled adapters,
several active adapters, per-row adapter names) takes peft's own forward. The class swap keeps the module's
parameters, state dict, save/load and merge exactly peft's.
"""

from __future__ import annotations

import functools


@functools.cache
def addmm_lora_linear():
    """The subclass of peft's ``lora.Linear`` whose forward adds the update with addmm (built on first use: peft and
    torch load only when a LoRA model exists)."""
    import torch
    from peft.tuners.lora.layer import Linear

    class AddmmLoraLinear(Linear):
        def forward(self, x, *args, **kwargs):
            active = self.active_adapters
            if args or kwargs or self.disable_adapters or self.merged or len(active) != 1:
                return super().forward(x, *args, **kwargs)
            adapter = active[0]
            if adapter not in self.lora_A or adapter in self.lora_variant:
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x)
            lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
            dropout = self.lora_dropout[adapter]
            if isinstance(dropout, torch.nn.Identity) and torch.is_autocast_enabled(x.device.type) \
                    and x.dtype == torch.get_autocast_dtype(x.device.type):
                hidden = lora_A(x)  # peft casts x up to the adapter's float32 and autocast straight back: two exact copies
            else:
                hidden = lora_A(dropout(self._cast_input_dtype(x, lora_A.weight.dtype)))
            base = result.reshape(-1, result.shape[-1])
            if base.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
                base = base.to(hidden.dtype)  # peft's sum promotes the same way (e.g. a bf16 base, fp32 adapter)
            updated = torch.addmm(base, hidden.reshape(-1, hidden.shape[-1]), lora_B.weight.t(), alpha=self.scaling[adapter])
            return updated.view(result.shape).to(result.dtype)

    return AddmmLoraLinear


def use_addmm_forward(model) -> int:
    """Swap the plain LoRA linears of ``model`` to ``AddmmLoraLinear``; returns how many were swapped."""
    from peft.tuners.lora.layer import Linear

    fast = addmm_lora_linear()
    swapped = 0
    for module in model.modules():
        if type(module) is Linear and not module.lora_variant and not any(b.bias is not None for b in module.lora_B.values()):
            module.__class__ = fast
            swapped += 1
    return swapped
