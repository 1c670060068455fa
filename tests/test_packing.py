"""Shared-prefix packing: layout bookkeeping, and equivalence with running M + 1 separate sequences."""
import pytest
import torch

import logo_kernels as lk
from logo.data import synthesize_positions
from logo.data.packing import RowLayout, pack_rows

transformers = pytest.importorskip("transformers")
from logo.attention import enable_shared_prefix_attention  # noqa: E402
from logo.objective import packed_logo_loss  # noqa: E402
from packed_reference import assert_packed_equals_separate, separate_logps  # noqa: E402

VOCAB = 89


def test_pack_rows_layout_by_hand():
    batch = pack_rows([torch.tensor([1, 2, 3])], [[torch.tensor([4, 5]), torch.tensor([6]), torch.tensor([7, 8])]],
                      prefix_positions=[torch.tensor([0, 10, 11])], pad_token_id=99)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert batch.position_ids.tolist() == [[0, 10, 11, 12, 13, 12, 12, 13]]  # every response starts at 12
    assert batch.layouts == [RowLayout(3, (2, 1, 2))]
    # token 4 <- prefix end (2), 5 <- 4 (3); 6 <- prefix end; 7 <- prefix end, 8 <- 7 (6)
    assert batch.score_index.tolist() == [2, 3, 2, 2, 6]
    assert batch.targets.tolist() == [4, 5, 6, 7, 8]
    assert batch.cu_seqlens.tolist() == [0, 2, 3, 5]
    assert batch.num_negatives == 2


def test_pack_rows_pads_rows_at_the_end_only():
    batch = pack_rows([torch.tensor([1, 2]), torch.tensor([1, 2, 3, 4])],
                      [[torch.tensor([5]), torch.tensor([6])], [torch.tensor([7, 8]), torch.tensor([9])]],
                      pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 5, 6, 0, 0, 0], [1, 2, 3, 4, 7, 8, 9]]
    assert batch.score_index.tolist() == [1, 1, 7 + 3, 7 + 4, 7 + 3]


@pytest.mark.parametrize("prefixes, responses, message", [
    ([torch.tensor([1])], [[torch.tensor([2])]], "same number"),
    ([torch.tensor([1])], [[torch.tensor([2]), torch.tensor([], dtype=torch.long)]], "response 1 must be a non-empty"),
    ([torch.tensor([], dtype=torch.long)], [[torch.tensor([2]), torch.tensor([3])]], "prefix must be a non-empty"),
    ([torch.tensor([1]), torch.tensor([1])], [[torch.tensor([2]), torch.tensor([3])], [torch.tensor([2])] * 3],
     "same number"),
])
def test_pack_rows_errors(prefixes, responses, message):
    with pytest.raises(ValueError, match=message):
        pack_rows(prefixes, responses)


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def examples(seed=0, batch=2, negatives=2):
    g = torch.Generator().manual_seed(seed)
    prefixes, responses, positions = [], [], []
    for b in range(batch):
        chunks = [int(x) for x in torch.randint(2, 6, (3,), generator=g)]
        prefix = torch.randint(0, VOCAB, (sum(chunks) + 2,), generator=g)  # 2 system tokens + 3 chunks
        synth = synthesize_positions(chunks, window=2048, prefix=2, tail=16, generator=g)
        prefixes.append(prefix)
        positions.append(synth.context)
        responses.append([torch.randint(0, VOCAB, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
                          for _ in range(negatives + 1)])
    return prefixes, responses, positions


def test_packed_rows_equal_separate_sequences_logps_and_all_gradients():
    assert_packed_equals_separate(tiny_llama(), *examples())


def test_packed_logo_loss_equals_the_loss_of_separate_sequences():
    model = tiny_llama()
    prefixes, responses, positions = examples(seed=2)
    batch = pack_rows(prefixes, responses, prefix_positions=positions)
    loss_fn = lk.LogoLoss(num_negatives=2, beta=10.0, gamma=3.0, sft_weight=0.1)
    ref_logps = separate_logps(model, prefixes, responses, positions)
    means = torch.stack([ref_logps[a:b].mean() for a, b in zip(batch.cu_seqlens[:-1], batch.cu_seqlens[1:])])
    means = means.view(-1, 3)
    z = 10.0 * (means[:, 0] - means[:, 1:].mean(1)) - 3.0
    expected = (-torch.nn.functional.logsigmoid(z) - 0.1 * means[:, 0]).mean()

    enable_shared_prefix_attention(model)
    out = packed_logo_loss(model, batch, loss_fn)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


def test_packed_loss_refuses_a_model_without_shared_prefix_attention():
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    batch = pack_rows(*examples()[:2])
    with pytest.raises(ValueError, match="enable_shared_prefix_attention"):
        packed_logo_loss(model, batch, lk.LogoLoss(num_negatives=2))
    enable_shared_prefix_attention(model)
    with pytest.raises(ValueError, match="expects num_negatives = 3"):
        packed_logo_loss(model, batch, lk.LogoLoss(num_negatives=3))
