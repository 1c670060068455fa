"""Mixture-of-experts: the packed LOGO loss carries the router's load-balancing loss as the model's forward would."""
import sys

import pytest
import torch

import logo_kernels as lk
from logo.attention import enable_shared_prefix_attention
from logo.data.packing import pack_rows
from logo.moe import real_token_mask, router_parameters, wants_router_aux_loss
from logo.objective import packed_logo_loss
from model_zoo import build
from test_attention_zoo import examples

LOSS = lk.LogoLoss(num_negatives=2, beta=10.0, gamma=3.0, sft_weight=0.1)


def moe(name, output_router_logits=True):
    model = build(name, output_router_logits=output_router_logits, router_aux_loss_coef=0.5).train()
    enable_shared_prefix_attention(model)
    return model


@pytest.mark.parametrize("name", ["qwen3-moe", "gpt-oss"])
def test_router_loss_equals_the_models_own_on_the_packed_rows(name):
    model = moe(name)
    prefixes, responses, positions = examples(batch=1)
    batch = pack_rows(prefixes, responses, prefix_positions=positions)  # one row: no padding
    out = packed_logo_loss(model, batch, LOSS)
    own = model(input_ids=batch.input_ids, position_ids=batch.position_ids, shared_prefix_layouts=batch.layouts,
                output_router_logits=True)
    torch.testing.assert_close(out.aux_loss, 0.5 * own.aux_loss, rtol=1e-6, atol=1e-7)
    model.config.output_router_logits = False
    plain = packed_logo_loss(model, batch, LOSS)
    assert plain.aux_loss is None
    torch.testing.assert_close(out.loss, plain.loss + out.aux_loss)


def test_router_loss_counts_the_real_tokens_of_each_row_only():
    model = moe("qwen3-moe")
    prefixes, responses, positions = examples(batch=2)
    batch = pack_rows(prefixes, responses, prefix_positions=positions)
    mask = real_token_mask(batch.input_ids.shape, batch.layouts, "cpu")
    assert (mask == 0).any()  # the rows differ in length: one is padded
    out = packed_logo_loss(model, batch, LOSS)
    routed = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                         shared_prefix_layouts=batch.layouts, output_router_logits=True).router_logits
    family = sys.modules[type(model).__module__]
    expected = 0.5 * family.load_balancing_loss_func(routed, model.num_experts, model.num_experts_per_tok, mask)
    torch.testing.assert_close(out.aux_loss, expected)
    unmasked = 0.5 * family.load_balancing_loss_func(routed, model.num_experts, model.num_experts_per_tok, None)
    assert not torch.allclose(out.aux_loss, unmasked)


def test_the_router_loss_reaches_the_routers_gradients():
    model = moe("gpt-oss")
    batch = pack_rows(*examples(batch=1)[:2])
    routers = router_parameters(model)
    assert routers and all(p.requires_grad for p in routers)
    grads = []
    for flag in (True, False):
        model.config.output_router_logits = flag
        model.zero_grad(set_to_none=True)
        packed_logo_loss(model, batch, LOSS).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in routers]))
    assert not torch.allclose(grads[0], grads[1])


def test_frozen_routers_change_nothing():
    model = moe("qwen3-moe")
    for p in router_parameters(model):
        p.requires_grad_(False)
    assert not wants_router_aux_loss(model)
    out = packed_logo_loss(model, pack_rows(*examples(batch=1)[:2]), LOSS)
    assert out.aux_loss is None
