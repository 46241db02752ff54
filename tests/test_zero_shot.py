"""E2 zero-shot tasks: batched scoring of every family equals a per-pair reference written from
lm-eval's conventions, rigged models make the answer certain, acc_norm's length normalisation, lm-eval's
stderr, bad records counted with file and line, 13-gram contamination, the built-in task's determinism."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

from lmforge.config import BuiltinCorpusConfig, TokenizerConfig
from lmforge.data.builtin import iter_builtin_corpus
from lmforge.data.document import Document
from lmforge.eval.builtin_tasks import CHOICE_WORDS, CONTEXT_WORDS, builtin_task_file
from lmforge.eval.contamination import contamination
from lmforge.eval.tasks import TaskItem, choice_logliks, evaluate_tasks, load_tasks, score_choices
from lmforge.models import build_model
from lmforge.models.decoder import DecoderConfig
from lmforge.models.encoder import EncoderConfig
from lmforge.models.encoder_decoder import EncoderDecoderConfig
from lmforge.tokenizer.special_tokens import SpecialTokens, infer_special_tokens, load_special_tokens
from lmforge.tokenizer.train import train_tokenizer

FAMILIES = ("decoder", "encoder", "encoder_decoder")
WORDS = ["the", "cat", "sat", "on", "mat", "dogs", "bark", "at", "night", "models", "read", "tokens", "quickly",
         "über", "naïve", "日本", "def", "return", "x", "y"]
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|mask|>", "<|cls|>", "<|sep|>"]
RIGGED_VOCAB = [*SPECIALS, "yes", "no", "maybe", "a", "bbbbbbbb", "rest", *WORDS]


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- rigged models: certain answers


def word_tokenizer() -> Tokenizer:
    """One token per word, so a choice's tokens and their log-probabilities are known exactly."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(RIGGED_VOCAB)}, unk_token="rest"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return tok


class Rigged(nn.Module):
    """The same log-probabilities at every position, called as any family calls its model; records the
    longest input it was shown."""

    def __init__(self, logprobs: dict[str, float], max_seq_len: int = 64):
        super().__init__()
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        rest = 1 - sum(math.exp(v) for v in logprobs.values())
        logits = torch.full((len(RIGGED_VOCAB),), -50.0)
        logits[RIGGED_VOCAB.index("rest")] = math.log(rest)  # the leftover mass, so the listed values are exact
        for word, value in logprobs.items():
            logits[RIGGED_VOCAB.index(word)] = value
        self.logits = logits
        self.longest = 0

    def forward(self, input_ids: torch.Tensor, layout: object = None, position_ids: object = None,
                decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        self.longest = max(self.longest, input_ids.shape[1])
        shape = (decoder_input_ids if decoder_input_ids is not None else input_ids).shape
        return self.logits.expand(*shape, -1)


@pytest.fixture(scope="module")
def words() -> tuple[Tokenizer, SpecialTokens]:
    tok = word_tokenizer()
    return tok, infer_special_tokens(tok)


@pytest.mark.parametrize("family", FAMILIES)
def test_rigged_model_gets_every_item_right(tmp_path: Path, words, family: str) -> None:
    tok, special = words
    rng = random.Random(0)
    records = []
    for i in range(12):
        choices = [" no", " maybe", " no no"]
        gold = rng.randrange(4)
        choices.insert(gold, " yes")
        records.append({"id": i, "context": " ".join(rng.choices(WORDS, k=rng.randrange(1, 9))), "choices": choices,
                        "gold": gold})
    path = write_jsonl(tmp_path / "yes.jsonl", records)
    model = Rigged({"yes": -0.1, "no": -3.0, "maybe": -4.0})
    out = evaluate_tasks(model, tok, special, [str(path)], family, "cpu", batch_size=5)["yes"]
    assert out["acc"] == 1.0 and out["acc_norm"] == 1.0 and out["n"] == 12 and out["skipped"] == 0
    assert out["acc_stderr"] == 0.0
    items, _ = load_tasks(path)
    logliks = choice_logliks(model, tok, special, items[:1], family)
    expected = {" yes": -0.1, " no": -3.0, " maybe": -4.0, " no no": -6.0}
    assert logliks[0] == pytest.approx([expected[c] for c in items[0].choices], abs=1e-5)


def test_acc_norm_divides_by_characters_and_can_disagree_with_acc(words) -> None:
    tok, special = words
    # " a": -1 over 2 characters; " bbbbbbbb": -2 over 9. acc takes " a", acc_norm the longer choice.
    model = Rigged({"a": -1.0, "bbbbbbbb": -2.0})
    items = [TaskItem("0", "the cat", (" a", " bbbbbbbb"), gold=1)]
    logliks = choice_logliks(model, tok, special, items, "decoder")
    assert logliks == [pytest.approx([-1.0, -2.0], abs=1e-5)]
    out = score_choices(items, logliks)
    assert out["acc"] == 0.0 and out["acc_norm"] == 1.0


def test_context_whitespace_moves_to_the_choice(words) -> None:
    tok, special = words
    model = Rigged({"yes": -0.5, "no": -2.0})
    # "the cat " + "yes" scores as "the cat" + " yes": the same tokens, the same log-likelihood.
    spaced = choice_logliks(model, tok, special, [TaskItem("0", "the cat ", ("yes", "no"), 0)], "decoder")
    plain = choice_logliks(model, tok, special, [TaskItem("0", "the cat", (" yes", " no"), 0)], "decoder")
    assert spaced == plain == [pytest.approx([-0.5, -2.0], abs=1e-5)]


@pytest.mark.parametrize("family", FAMILIES)
def test_long_contexts_are_cut_from_the_left(words, family: str) -> None:
    tok, special = words
    model = Rigged({"yes": -0.25}, max_seq_len=8)
    items = [TaskItem("0", " ".join(["cat"] * 40), (" yes yes", " no"), 0)]
    logliks = choice_logliks(model, tok, special, items, family)
    assert model.longest <= 8
    assert logliks[0][0] == pytest.approx(-0.5, abs=1e-5)  # both choice tokens still scored


def test_stderr_is_lm_evals_sample_stderr() -> None:
    items = [TaskItem(str(i), "c", (" a", " b"), 0) for i in range(4)]
    logliks = [[-1.0, -2.0]] * 3 + [[-2.0, -1.0]]  # three right, one wrong
    out = score_choices(items, logliks)
    scores = [1, 1, 1, 0]
    assert out["acc"] == 0.75
    assert out["acc_stderr"] == pytest.approx(statistics.stdev(scores) / math.sqrt(len(scores)), rel=1e-12)
    assert out["acc_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3), rel=1e-12)
    assert score_choices(items[:1], logliks[:1])["acc_stderr"] is None  # undefined for one item


def test_ties_go_to_the_first_choice_as_numpys_argmax() -> None:
    items = [TaskItem("0", "c", (" ab", " ab"), 1)]
    assert score_choices(items, [[-1.0, -1.0]])["acc"] == 0.0


def test_bad_records_are_skipped_and_counted_with_file_and_line(tmp_path: Path, words) -> None:
    tok, special = words
    good = {"id": "g", "context": "the cat", "choices": [" yes", " no"], "gold": 0}
    path = write_jsonl(tmp_path / "bad.jsonl", [
        good,
        {"id": "m", "context": "the cat", "choices": [" yes"]},  # line 2: no gold
        {**good, "gold": 2},  # line 3: out of range
        {**good, "choices": []},  # line 4: empty choice list
        "{not json",  # line 5
        "",  # line 6: blank, not a problem
        {**good, "gold": True},  # line 7: a bool is not an index
        {**good, "id": 7},
    ])
    items, problems = load_tasks(path)
    assert [it.id for it in items] == ["g", "7"]
    assert [p.split(": ")[0] for p in problems] == [f"{path}:{n}" for n in (2, 3, 4, 5, 7)]
    assert "gold" in problems[0] and "out" not in problems[0]
    out = evaluate_tasks(Rigged({"yes": -0.1}), tok, special, [str(path)], "decoder", "cpu", 4)["bad"]
    assert out["n"] == 2 and out["skipped"] == 5 and out["problems"] == problems and out["acc"] == 1.0


def test_unknown_family_is_refused(words) -> None:
    tok, special = words
    with pytest.raises(ValueError, match="family"):
        choice_logliks(Rigged({}), tok, special, [], "rnn")


# ---------------------------------------------------------------- real tiny models vs a per-pair reference


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, SpecialTokens]:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) + rng.choice([".", "!\n"]) for _ in range(300)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=400), path, progress=False)
    return tok, load_special_tokens(path, tok)


MODELS = {"decoder": "decoder", "encoder": "encoder", "bart": "encoder_decoder", "t5": "encoder_decoder"}


def tiny_model(kind: str, vocab: int) -> nn.Module:
    """A tiny model of `kind` whose weights are noised far past init, so its choices' scores differ."""
    torch.manual_seed(0)
    shared = dict(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, max_seq_len=48)
    cfg = {
        "decoder": DecoderConfig(**shared),
        "encoder": EncoderConfig(**shared),
        "bart": EncoderDecoderConfig(**shared, variant="bart"),
        "t5": EncoderDecoderConfig(**shared, variant="t5"),
    }[kind]
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def reference_logliks(model: nn.Module, tok: Tokenizer, special: SpecialTokens, item: TaskItem,
                      family: str) -> list[float]:
    """lm-eval's recipe, one (context, choice) pair and one forward at a time, no padding, no batching."""
    out = []
    for choice in item.choices:
        context = item.context
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            choice, context = context[-n_spaces:] + choice, context[:-n_spaces]
        whole = tok.encode(context + choice).ids
        ctx = tok.encode(context).ids
        cont = whole[len(ctx):]
        out.append(sum(_pair_logprobs(model, special, ctx, cont, family)))
    return out


def _pair_logprobs(model: nn.Module, special: SpecialTokens, ctx: list[int], cont: list[int],
                   family: str) -> list[float]:
    with torch.no_grad():
        if family == "decoder":
            ids = torch.tensor([[special.eos, *ctx, *cont]])
            logp = model(ids[:, :-1])[0].log_softmax(-1)
            return [float(logp[len(ctx) + j, t]) for j, t in enumerate(cont)]
        if family == "encoder_decoder":
            dec = torch.tensor([[special.pad, *cont[:-1]]])
            logp = model(torch.tensor([[*ctx, special.eos]]), decoder_input_ids=dec)[0].log_softmax(-1)
            return [float(logp[j, t]) for j, t in enumerate(cont)]
        seq = [special.cls, *ctx, *cont, special.sep]
        scores = []
        for j, t in enumerate(cont):
            p = 1 + len(ctx) + j
            masked = torch.tensor([seq[:p] + [special.mask] + seq[p + 1:]])
            scores.append(float(model(masked)["logits"][0, p].log_softmax(-1)[t]))
        return scores


def first_argmax(values: list[float]) -> int:
    return values.index(max(values))


def reference_scores(items: list[TaskItem], logliks: list[list[float]]) -> tuple[float, float]:
    pairs = list(zip(items, logliks, strict=True))
    acc = sum(first_argmax(ll) == it.gold for it, ll in pairs) / len(items)
    norm = sum(first_argmax([v / len(c) for v, c in zip(ll, it.choices, strict=True)]) == it.gold for it, ll in pairs)
    return acc, norm / len(items)


def random_items(n: int, seed: int) -> list[dict[str, object]]:
    """Contexts of many lengths (so batches pad), some ending in a space with a bare choice."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        context = " ".join(rng.choices(WORDS, k=rng.randrange(1, 12)))
        n_choices = rng.choice([2, 4])
        choices: list[str] = []
        while len(choices) < n_choices:  # distinct: equal choices tie, and rounding would pick the winner
            choice = " " + " ".join(rng.choices(WORDS, k=rng.randrange(1, 5)))
            choices += [choice] if choice not in choices else []
        if i % 3 == 0:
            context, choices = context + " ", [c[1:] for c in choices]
        records.append({"id": i, "context": context, "choices": choices, "gold": rng.randrange(len(choices))})
    return records


@pytest.mark.parametrize("kind", MODELS)
def test_batched_scores_equal_the_per_pair_reference(tmp_path: Path, bpe, kind: str) -> None:
    tok, special = bpe
    model, family = tiny_model(kind, tok.get_vocab_size()), MODELS[kind]
    path = write_jsonl(tmp_path / "rand.jsonl", random_items(24, seed=1))
    items, _ = load_tasks(path)
    expected = [reference_logliks(model, tok, special, it, family) for it in items]
    got = choice_logliks(model, tok, special, items, family, "cpu", batch_size=7)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, rel=1e-4, abs=1e-4)
    assert len({round(v, 3) for ll in expected for v in ll}) > 20  # the model tells choices apart
    out = evaluate_tasks(model, tok, special, [str(path)], family, "cpu", batch_size=7)["rand"]
    acc, acc_norm = reference_scores(items, expected)
    assert (out["acc"], out["acc_norm"]) == (acc, acc_norm)
    assert out["n"] == 24 and out["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 23))


# ---------------------------------------------------------------- contamination


@pytest.mark.parametrize("overlap, found", [(13, 1), (12, 0)])
def test_contamination_finds_a_13_gram_not_a_12_gram(tmp_path: Path, overlap: int, found: int) -> None:
    vocab = [f"w{i}" for i in range(40)]
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"id": "a", "context": " ".join(vocab[:20]), "choices": [" x", " y"], "gold": 0},
        {"id": "b", "context": " ".join(vocab[20:]), "choices": [" x", " y"], "gold": 0},
        {"id": "short", "context": "one two", "choices": [" x"], "gold": 0},
    ])
    # Case and punctuation do not hide a copy.
    planted = ", ".join(vocab[3:3 + overlap]).upper()
    out = contamination([path], [f"unrelated words {planted} more words", Document("d", "nothing here", "s")])["t"]
    assert out["contaminated"] == found and out["items"] == 3 and out["too_short"] == 1
    assert out["share"] == pytest.approx(found / 3)
    assert out["contaminated_ids"] == (["a"] if found else [])


@pytest.mark.parametrize("overlap, found", [(13, 1), (12, 0)])
def test_contamination_counts_cjk_characters_as_words(tmp_path: Path, overlap: int, found: int) -> None:
    text = "我们今天在公园里学习语言模型的训练方法和评估"
    path = write_jsonl(tmp_path / "zh.jsonl", [{"id": "z", "context": text, "choices": ["。"], "gold": 0}])
    out = contamination([path], [f"另外{text[2:2 + overlap]}其他"])["zh"]
    assert out["contaminated"] == found


def test_contamination_reaches_across_into_the_gold_choice(tmp_path: Path) -> None:
    ctx = " ".join(f"c{i}" for i in range(10))
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "context": ctx, "choices": [" g1 g2 g3", " d1 d2 d3"],
                                               "gold": 0}])
    assert contamination([path], [ctx + " g1 g2 g3"])["t"]["contaminated"] == 1
    assert contamination([path], [ctx + " d1 d2 d3"])["t"]["contaminated"] == 0


# ---------------------------------------------------------------- the built-in task


def synthetic_documents(n: int) -> list[Document]:
    rng = random.Random(5)
    return [Document(f"doc{i}", " ".join(rng.choices(WORDS, k=rng.randrange(30, 120))), "prose") for i in range(n)]


def test_builtin_task_is_deterministic_and_true_to_its_documents(tmp_path: Path) -> None:
    docs = synthetic_documents(15)
    first = builtin_task_file(tmp_path / "a", docs, n_items=20)
    again = builtin_task_file(tmp_path / "b", list(reversed(docs)), n_items=20)
    assert first.read_bytes() == again.read_bytes()
    items, problems = load_tasks(first)
    assert len(items) == 20 and problems == []
    texts = {d.id: d.text.split() for d in docs}
    for item in items:
        doc_id, k = item.id.rsplit("#", 1)
        size = CONTEXT_WORDS + CHOICE_WORDS
        passage = texts[doc_id][int(k) * size:(int(k) + 1) * size]
        assert (item.context + item.choices[item.gold]).split() == passage
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
    other = builtin_task_file(tmp_path / "c", docs, n_items=20, seed=1)
    assert other.read_bytes() != first.read_bytes()


def test_builtin_task_leaves_out_passages_found_in_training(tmp_path: Path) -> None:
    docs = synthetic_documents(15)
    seen = docs[4].text.split()[:CONTEXT_WORDS + CHOICE_WORDS]
    training = ["intro " + " ".join(seen[5:18]) + " outro"]  # 13 words of doc4's first passage
    items, _ = load_tasks(builtin_task_file(tmp_path, docs, n_items=100, exclude=training))
    ids = {it.id for it in items}
    assert "doc4#0" not in ids and "doc5#0" in ids
    report = contamination([tmp_path / "builtin_continuation.jsonl"], training)["builtin_continuation"]
    assert report["contaminated"] == 0 and report["items"] == len(items)

    def unread():  # a training set that must not be read: every task was built clean against it
        raise AssertionError("the training documents were read again")
        yield

    task = tmp_path / "builtin_continuation.jsonl"
    assert contamination([task], unread(), checked=[task]) == {"builtin_continuation": report}
    other = tmp_path / "other.jsonl"
    record = {"id": "o1", "context": " ".join(seen[:20]), "choices": [" x", " y"], "gold": 0}
    other.write_text(json.dumps(record) + "\n")
    both = contamination([task, other], training, checked=[task])  # the other task is still scanned
    assert both["builtin_continuation"] == report and both["other"]["contaminated"] == 1


def test_builtin_task_from_the_builtin_corpus_is_fast_and_sized(tmp_path: Path) -> None:
    docs = list(iter_builtin_corpus(BuiltinCorpusConfig(max_prose_bytes=60_000, max_code_bytes=0)))
    items, problems = load_tasks(builtin_task_file(tmp_path, docs, n_items=300))
    assert 50 <= len(items) <= 300 and problems == []
    assert len({it.gold for it in items}) == 4  # the answer's position varies


def test_builtin_task_refuses_too_few_documents(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 4 documents"):
        builtin_task_file(tmp_path, synthetic_documents(3), n_items=5)
