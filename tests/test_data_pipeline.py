"""Offline tokenizer, synthetic retrieval tasks, record encoding (chat/plain templates) and batching."""
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from logo.data.batching import PositionSynthesis, collate, prompt_positions  # noqa: E402
from logo.data.encoding import encode_record, prompt_pieces  # noqa: E402
from logo.data.records import PreferenceRecord, read_preference_file, write_preference_file  # noqa: E402
from logo.data.synthetic import KEYS, NEEDLE, VALUES, make_kv_records  # noqa: E402
from logo.data.tokenizer import default_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


def test_default_tokenizer_is_deterministic_and_round_trips(tokenizer, tmp_path):
    again = default_tokenizer(save_dir=str(tmp_path))
    assert tokenizer.get_vocab() == again.get_vocab()
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "The special magic number for the lantern is 4821. Ünïcödé ✓"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.decode(loaded(text).input_ids) == text  # byte-level: any text round-trips
    assert loaded.eos_token == "<|end|>" and loaded.pad_token == "<|pad|>" and loaded.chat_template


def pairs(answer):
    assert answer.startswith("Pairs: ")
    return [tuple(p.split(" ")) for p in answer[len("Pairs: "):].split(", ")]


def test_synthetic_records_are_correct_by_construction():
    records = make_kv_records(20, context_words=200)
    assert len({r.id for r in records}) == 20
    for r in records:
        context = r.context[0]
        asked = re.search(r"paired with (\w+)\?", r.question).group(1)
        assert asked in KEYS
        found = re.findall(re.escape(NEEDLE.format(key=asked, value="@")).replace("@", r"(\w+)"), context)
        assert pairs(r.chosen) == [(asked, v) for v in found]  # every value of the key, in order of appearance
        hallucinated = [v for k, v in pairs(r.rejected[0])]
        assert {k for k, v in pairs(r.rejected[0])} == {asked} and not set(hallucinated) & set(found)
        other = re.findall(r"Remember this pair: (\w+) " + hallucinated[0], context)
        assert other and other[0] != asked and all(v in VALUES for v in hallucinated)  # another key's values
        assert r.rejected[1] in context and "Remember this pair" not in r.rejected[1]  # unfollowing: copied filler
        assert 180 <= len(context.split()) <= 320


def test_synthetic_splits_are_deterministic_and_disjoint(tmp_path):
    a, b = make_kv_records(5, split="train"), make_kv_records(5, split="train")
    assert a == b
    heldout = make_kv_records(5, split="heldout")
    assert not {r.context for r in a} & {r.context for r in heldout}
    path = tmp_path / "train.jsonl"
    write_preference_file(a, str(path))
    assert read_preference_file(str(path), num_negatives=2) == a
    with pytest.raises(ValueError, match="split"):
        make_kv_records(1, split="test")


def record(system="Be brief."):
    return PreferenceRecord(id="r1", context=("first chunk of text", "second chunk"), question="Which chunk?",
                            chosen="the first", rejected=("the second", "no idea"), system=system)


def test_chat_template_encoding_partitions_the_rendered_prompt(tokenizer):
    rec = record()
    example = encode_record(rec, tokenizer, num_negatives=2)
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": rec.system},
         {"role": "user", "content": "first chunk of text\n\nsecond chunk\n\nWhich chunk?"}],
        tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(example.prompt) == rendered
    assert tokenizer.decode(example.context) == "first chunk of text\n\nsecond chunk"
    assert [tokenizer.decode(r) for r in example.responses] == ["the first<|end|>", "the second<|end|>", "no idea<|end|>"]
    assert all(r[-1] == tokenizer.eos_token_id for r in example.responses)


def test_plain_template_when_there_is_no_chat_template(tokenizer):
    example = encode_record(record(), tokenizer, use_chat_template=False)
    assert tokenizer.decode(example.prompt) == "Be brief.\n\nfirst chunk of text\n\nsecond chunk\n\nQuestion: Which chunk?\nAnswer:"
    assert tokenizer.decode(example.responses[0]) == " the first<|end|>"


def test_template_without_system_role_gets_the_system_text_in_the_user_turn(tokenizer):
    strict = default_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                            "{% endif %}[{{ m['role'] }}]{{ m['content'] }}[/]{% endfor %}"
                            "{% if add_generation_prompt %}[assistant]{% endif %}")
    strict.eos_token = "[/]"
    head, context, tail, reply = prompt_pieces(strict, record())
    assert head == "[user]Be brief.\n\n" and tail == "\n\nWhich chunk?[/][assistant]" and reply == ("", "[/]")


def test_truncation_and_negatives(tokenizer):
    example = encode_record(record(), tokenizer, num_negatives=1, max_context_tokens=3, max_response_tokens=1)
    assert len(example.context) == 3 and len(example.responses) == 2 and all(len(r) == 1 for r in example.responses)
    with pytest.raises(ValueError, match="r1.*1 rejected responses, need 3"):
        encode_record(PreferenceRecord("r1", ("c",), "q", "a", ("b",)), tokenizer, num_negatives=3)


def test_collate_synthesizes_positions_inside_the_window(tokenizer):
    examples = [encode_record(r, tokenizer) for r in make_kv_records(3, context_words=300)]
    synthesis = PositionSynthesis(window=4096, chunk_tokens=64)
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id, synthesis=synthesis,
                    generator=torch.Generator().manual_seed(0))
    for row, (example, layout) in enumerate(zip(examples, batch.layouts)):
        prompt_len = len(example.prompt)
        pos = batch.position_ids[row, :prompt_len]
        assert (pos[1:] > pos[:-1]).all() and int(pos[-1]) < 4096
        assert pos[:len(example.head)].tolist() == list(range(len(example.head)))  # system prefix untouched
        tail = pos[prompt_len - len(example.tail):]
        assert (tail[1:] - tail[:-1] == 1).all()  # the question right after the context
        start = prompt_len
        for n in layout.response_lengths:  # every response starts right after the prompt
            assert int(batch.position_ids[row, start]) == int(pos[-1]) + 1
            start += n
    assert int(batch.position_ids.max()) > 2 * max(len(e.prompt) for e in examples)  # spread over the window
    plain = prompt_positions(examples[0], PositionSynthesis(window=None))
    assert plain.tolist() == list(range(len(examples[0].prompt)))
    with pytest.raises(ValueError, match="strategy"):
        PositionSynthesis(window=10, strategy="random")
