"""verl on logo_kernels: the per-token log-probs and entropy of verl's fused-kernel path run on our op.

    from logo_kernels.integrations import verl as logo_verl
    logo_verl.enable()         # in every process that builds a model, before verl patches it
    ...                        # verl as usual, with actor_rollout_ref.model.use_fused_kernels=True
    logo_verl.disable()        # verl's own kernels again (or: with logo_verl.enabled(): ...)

verl's Ray workers are other processes: ``VERL_USE_EXTERNAL_MODULES=logo_kernels.integrations.verl_autoenable``
makes verl enable it wherever it is imported (:mod:`logo_kernels.integrations.verl_autoenable`).

verl (0.9.1) computes log-probs and entropy for PPO / GRPO / DAPO without logits when
``model.use_fused_kernels`` is set: ``apply_monkey_patch`` replaces the model's forward by one that runs the
backbone, rolls the labels (or takes the engine's ``shift_labels``, rolled before the Ulysses split), and calls
one of two kernels, each imported from its module at every call:

* backends ``torch`` and ``liger``: ``verl.utils.experimental.torch_functional.FusedLinearForPPO(impl_backend=...)
  .forward(hidden_states, vocab_weights, input_ids, temperature)`` -> (log_probs, entropy) shaped like the ids;
* backend ``triton``: ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight, labels,
  temperature, reduction)`` -> flat (log_probs [N], entropy [N]) for ``reduction="none"``.

``enable()`` replaces those two module attributes with :class:`LogoFusedLinearForPPO` and
:func:`logo_linear_cross_entropy`, which compute both outputs with :func:`logo_kernels.linear_logprobs`
(log-probs and entropy differentiable, fp32 — verl's torch kernel returns the entropy in the hidden dtype; no
[tokens, vocab] tile beyond one backend block; non-finite hidden states or head raise, as the op does everywhere,
instead of a NaN loss). Everything else stays verl's: label rolling, temperature, sequence parallelism, the
engine's micro-batching, the loss. What verl's fused path gets wrong is fixed or refused instead of computed:

* an FSDP2 LM head sharded on its own (untied embeddings: verl wraps ``lm_head`` separately) reaches the kernel as
  a DTensor that verl's kernels cannot multiply, and whose gradient FSDP2 would not reduce (verl issue #5633): ours
  gathers it and averages its gradient over the ranks (:func:`_full`);
* verl's fused forward passes ``lm_head.weight`` alone, so a model that transforms its logits after the head —
  Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``, a bias on
  ``lm_head`` (Phi), a LoRA adapter on it — would be scored without it: after ``enable()``, ``apply_monkey_patch(...,
  use_fused_kernels=True)`` refuses such a model with a ValueError naming the family and the feature, and the
  patched forward checks again at every call (verl's engine adds LoRA after patching). A model patched before
  ``enable()`` is not checked.

Not swapped: Megatron's fused path (``verl.models.mcore``) binds verl's kernel at import and passes a
tensor-parallel vocabulary group; it keeps verl's kernel (``enable()`` warns when those modules are already
loaded), and :func:`logo_linear_cross_entropy` refuses a ``dist_process_group``. verl's other engines (automodel,
VeOmni) have fused paths of their own that do not call these kernels.

``enable`` checks the installed verl against the versions this contract was tested with and refuses others
(``allow_untested=True`` tries anyway, with a warning).
"""
from __future__ import annotations

import inspect
import sys
import warnings
from typing import Optional, Tuple

import torch

from .._validation import check_filter_eps
from ..linear_logprobs import linear_logprobs
from ._dropin import check_contract, enabled_block, restore_attributes

#: verl versions whose fused-kernel contract the tests run against (tests/with_verl/).
TESTED_VERL_VERSIONS = ("0.9.1",)
_MODULE_PARAMETERS = ("self", "hidden_states", "vocab_weights", "input_ids", "temperature")
_CE_PARAMETERS = ("ctx", "hidden", "weight", "labels", "temperature", "reduction", "dist_process_group")
_REDUCTIONS = ("none", "sum", "mean")

_saved: Optional[dict] = None
_backend = "auto"
_filter_eps = None


def _full(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The whole head from its FSDP2 shards (a DTensor), on the hidden states' device; other tensors as they are.

    verl's fused forward reads ``lm_head.weight`` without running ``lm_head``, so FSDP2 neither gathers that module
    nor reduces its gradient. The gather is differentiable, and its backward averages the gradient over the mesh
    before keeping each rank's shard (``Partial("avg")``): the data-parallel mean FSDP2 applies to the gradients it
    reduces itself. The gathered head is FSDP2's master copy (fp32 under verl's bf16 mixed precision, which casts
    only in a module's own forward): it is cast to the hidden states' half precision, as the cast would have.
    """
    if not hasattr(weight, "full_tensor") or not hasattr(weight, "device_mesh"):
        return weight
    from torch.distributed.tensor import Partial

    full = weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)
    if hidden.dtype in (torch.bfloat16, torch.float16) and full.dtype == torch.float32:
        full = full.to(hidden.dtype)
    return full.to(hidden.device)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a Python float; a per-sample temperature tensor is not supported by "
                        "verl's fused kernels either")
    return float(temperature)


def _logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          temperature) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p(label), entropy) fp32, shaped like ``labels``; labels [...] ids in [0, V) (-100 gives 0, as Liger)."""
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"input_ids {tuple(labels.shape)} must match hidden_states {tuple(hidden.shape)} without "
                         "its last dimension")
    stats = linear_logprobs(hidden, _full(weight, hidden), labels, temperature=_check_temperature(temperature),
                            outputs=("logp", "entropy"), backend=_backend, filter_eps=_filter_eps)
    return stats.logp, stats.entropy


class LogoFusedLinearForPPO(torch.nn.Module):
    """Drop-in for ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (backends ``torch`` and
    ``liger``): ``forward(hidden_states [..., D], vocab_weights [V, D], input_ids [...], temperature)`` ->
    (log_probs, entropy), fp32, shaped like ``input_ids``, both differentiable w.r.t. hidden and weight.
    ``chunk_size`` is accepted and unused: the op bounds its own working memory."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'.")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
        return _logprobs_and_entropy(hidden_states, vocab_weights, input_ids, temperature)


def logo_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              temperature: float = 1.0, reduction: str = "none", dist_process_group=None):
    """Drop-in for ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (backend ``triton``): hidden
    [..., D], weight [V, D], labels [...] -> (log_probs, entropy) fp32, flattened to [N]; with ``reduction`` "sum"
    or "mean" the log-probs are summed / averaged over the tokens (entropy stays [N]), as verl's kernel does."""
    if dist_process_group is not None:
        raise ValueError("logo_linear_cross_entropy: dist_process_group (a vocabulary split over tensor-parallel "
                         "ranks, Megatron's path) is not supported; the op needs the whole LM head on each rank")
    if not isinstance(reduction, str) or reduction.lower() not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    log_probs, entropy = _logprobs_and_entropy(hidden, weight, labels, temperature)
    log_probs, entropy = log_probs.reshape(-1), entropy.reshape(-1)
    if reduction.lower() == "sum":
        log_probs = log_probs.sum()
    elif reduction.lower() == "mean":
        log_probs = log_probs.mean()
    return log_probs, entropy


def _head_features(model) -> list:
    """What verl's fused forward would drop for this model: logit transforms after the head, a LoRA head."""
    from .hf import HeadTransform

    config = getattr(model, "config", None)
    found = []
    if config is not None:
        transform = HeadTransform.of(config)
        if transform.softcap is not None:
            found.append(f"final_logit_softcapping={transform.softcap}")
        if transform.logit_scale != 1.0:
            name = HeadTransform.scale_attribute(config)
            found.append(f"{name}={getattr(HeadTransform.text_config(config), name)}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "base_layer"):
        found.append("a LoRA adapter on lm_head")
    if head is not None and getattr(getattr(head, "base_layer", head), "bias", None) is not None:
        found.append("a bias on lm_head")
    return found


def _refuse_if_dropped(model) -> None:
    found = _head_features(model)
    if found:
        family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"verl use_fused_kernels on {family} ({type(model).__name__}): the model's logits use "
            f"{', '.join(found)}, which verl's fused forward drops (it multiplies by lm_head.weight alone) — "
            "the log-probs would be wrong; set use_fused_kernels=False for this model")


def _guarded(patch_forward_with_backends):
    """verl's ``patch_forward_with_backends``, refusing models whose logits its fused forward would get wrong: when
    it patches (a model's features as built) and at every forward of the patched class (verl's engine adds LoRA
    after patching)."""

    def patch(model, use_fused_kernels: bool = False, fused_kernels_backend: str = None):
        fused = use_fused_kernels and fused_kernels_backend in ("torch", "triton", "liger")
        if fused:
            _refuse_if_dropped(model)
        result = patch_forward_with_backends(model, use_fused_kernels=use_fused_kernels,
                                             fused_kernels_backend=fused_kernels_backend)
        forward = model.__class__.forward
        if fused and not getattr(forward, "_logo_checked", False):
            def checked_forward(self, *args, **kwargs):
                _refuse_if_dropped(self)
                return forward(self, *args, **kwargs)

            checked_forward._logo_checked = True
            checked_forward.__wrapped__ = forward
            model.__class__.forward = checked_forward
        return result

    patch.__wrapped__ = patch_forward_with_backends
    return patch


def _modules(allow_untested: bool):
    try:
        import verl
        import verl.models.transformers.monkey_patch as monkey_patch
        import verl.utils.experimental.torch_functional as torch_functional
        import verl.utils.kernel.linear_cross_entropy as lce
    except ImportError as error:
        raise ImportError("logo_kernels.integrations.verl needs verl: pip install 'logo-kernels[verl]' "
                          f"(tested: verl=={' / '.join(TESTED_VERL_VERSIONS)}; it pins transformers<5.11, so it "
                          "lives in its own environment: make verl-env)") from error
    problems = []
    version = getattr(verl, "__version__", "unknown")
    if version not in TESTED_VERL_VERSIONS:
        problems.append(f"verl {version} is not a tested version ({', '.join(TESTED_VERL_VERSIONS)})")
    module_kernel = getattr(torch_functional, "FusedLinearForPPO", None)
    ce_kernel = getattr(lce, "linear_cross_entropy", None)
    if module_kernel is None or ce_kernel is None or not hasattr(monkey_patch, "patch_forward_with_backends"):
        problems.append("verl has no FusedLinearForPPO / linear_cross_entropy / patch_forward_with_backends where "
                        "0.9.1 has them")
    else:
        if module_kernel is not LogoFusedLinearForPPO:
            found = tuple(inspect.signature(module_kernel.forward).parameters)
            if found != _MODULE_PARAMETERS:
                problems.append(f"verl's FusedLinearForPPO.forward takes {found}, not {_MODULE_PARAMETERS}")
        if ce_kernel is not logo_linear_cross_entropy:
            function = getattr(getattr(lce, "LinearCrossEntropy", None), "forward", None)
            found = tuple(inspect.signature(function).parameters) if function is not None else ()
            if found != _CE_PARAMETERS:
                problems.append(f"verl's LinearCrossEntropy.forward takes {found}, not {_CE_PARAMETERS}")
    check_contract("verl", "fused-kernel", problems, allow_untested, f"verl=={TESTED_VERL_VERSIONS[-1]}")
    return monkey_patch, torch_functional, lce


def enable(*, backend: str = "auto", allow_untested: bool = False, filter_eps=None) -> None:
    """Routes verl's fused log-prob / entropy kernels to :func:`logo_kernels.linear_logprobs` (module doc);
    ``backend`` is the op's ("auto", "cpp", "torch", "triton"), ``filter_eps`` its gradient filtering (None: exact;
    "auto" or a float, docs/filtering.md). Idempotent."""
    global _saved, _backend, _filter_eps
    check_filter_eps(filter_eps, torch.float32)
    monkey_patch, torch_functional, lce = _modules(allow_untested)
    _backend, _filter_eps = backend, filter_eps
    if _saved is None:
        _saved = {(torch_functional, "FusedLinearForPPO"): torch_functional.FusedLinearForPPO,
                  (lce, "linear_cross_entropy"): lce.linear_cross_entropy,
                  (monkey_patch, "patch_forward_with_backends"): monkey_patch.patch_forward_with_backends}
        torch_functional.FusedLinearForPPO = LogoFusedLinearForPPO
        lce.linear_cross_entropy = logo_linear_cross_entropy
        monkey_patch.patch_forward_with_backends = _guarded(monkey_patch.patch_forward_with_backends)
    if any(name.startswith("verl.models.mcore") for name in sys.modules):
        warnings.warn("logo_kernels.integrations.verl: Megatron's fused path (verl.models.mcore) keeps verl's "
                      "kernel (bound at import, vocabulary split over tensor-parallel ranks)", RuntimeWarning,
                      stacklevel=2)


def disable() -> None:
    """verl's own kernels again; idempotent."""
    global _saved, _backend, _filter_eps
    _backend, _filter_eps = "auto", None
    if _saved is None:
        return
    restore_attributes(_saved)
    _saved = None


def is_enabled() -> bool:
    return _saved is not None


def enabled(*, backend: str = "auto", allow_untested: bool = False, filter_eps=None):
    """``with enabled(): ...`` — verl on our op inside the block only."""
    return enabled_block(enable, disable, is_enabled, backend=backend, allow_untested=allow_untested,
                         filter_eps=filter_eps)
