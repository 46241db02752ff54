"""What holds for every family and every objective alike: meta-device construction then init, and
Chinese text through every objective into every model it can train."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.config import TokenizerConfig
from lmforge.models import build_model, materialize
from lmforge.objectives import ObjectiveContext, build_objective, loss_sums
from lmforge.recipe import load_config
from lmforge.tokenizer.special_tokens import load_special_tokens
from lmforge.tokenizer.train import train_tokenizer
from lmforge.tokens.loader import Batch

SHAPE = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=128", "train.seq_len=64"]
FAMILIES = {
    "decoder": ["model.arch=decoder"],
    "decoder_learned": ["model.arch=decoder", "model.position=learned"],
    "decoder_alibi": ["model.arch=decoder", "model.position=alibi"],
    "encoder": ["model.arch=encoder", "objective.name=mlm"],
    "t5": ["model.arch=encoder_decoder", "objective.name=span_corruption"],
    "bart": ["model.arch=encoder_decoder", "model.variant=bart", "objective.name=bart"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_built_on_meta_then_initialised_equals_built_directly(family: str) -> None:
    """Parallelism wraps a model before its weights exist: construction allocates nothing and
    `init_weights()` alone sets every value (same RNG order, same result)."""
    cfg = load_config(None, [*SHAPE, "model.vocab_size=300", *FAMILIES[family]]).model
    torch.manual_seed(0)
    direct = build_model(cfg)
    lazy = build_model(cfg, init=False)
    assert all(p.is_meta for p in lazy.parameters())
    materialize(lazy, "cpu")
    torch.manual_seed(0)
    lazy.init_weights()
    want = direct.state_dict()
    for name, value in lazy.state_dict().items():
        assert torch.equal(value, want[name]), name
    # Tied weights stay one tensor through materialisation.
    assert len(list(lazy.parameters())) == len(list(direct.parameters()))


CHINESE = [
    "语言模型的预训练需要大量干净的文本。我们先去重，再过滤，然后训练分词器！最后把文本切成词元。",
    "北京是中国的首都，也是一座历史悠久的城市。故宫、长城和天坛每年吸引数百万游客？是的。",
    "机器学习研究者比较不同的目标函数：掩码语言模型、前缀语言模型、跨度破坏和去噪自编码器。",
]
OBJECTIVES = {
    "lm": "decoder", "prefix_lm": "decoder", "fim": "decoder", "mlm": "encoder",
    "span_corruption": "encoder_decoder", "bart": "encoder_decoder", "ul2": "encoder_decoder",
}


@pytest.fixture(scope="module")
def chinese(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok = train_tokenizer(CHINESE * 30 + ["English words keep the byte alphabet honest."] * 10,
                          TokenizerConfig(vocab_size=600), path, progress=False)
    return tok, load_special_tokens(path, tok)


def chinese_batch(tok, eos: int, width: int, rows: int = 4) -> Batch:
    stream, docs = [], []
    for i in range(40):
        ids = tok.encode(CHINESE[i % 3]).ids + [eos]
        stream += ids
        docs += [i] * len(ids)
    tokens = np.stack([np.array(stream[r * 37 : r * 37 + width]) for r in range(rows)]).astype(np.int64)
    doc_ids = np.stack([np.array(docs[r * 37 : r * 37 + width]) for r in range(rows)]).astype(np.int64)
    return Batch(tokens, doc_ids, np.arange(rows, dtype=np.int64))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_on_chinese_trains_its_family(chinese, objective: str) -> None:
    tok, special = chinese
    arch = OBJECTIVES[objective]
    cfg = load_config(None, [*SHAPE, f"model.vocab_size={tok.get_vocab_size()}", f"model.arch={arch}",
                             f"objective.name={objective}"])
    obj = build_objective(cfg.objective, ObjectiveContext(special, tok.get_vocab_size(), 0, tok))
    ex = obj(chinese_batch(tok, special.eos, obj.window(64)))
    assert ex.input_ids.shape[1] == 64 and float(ex.loss_mask.sum()) > 0
    assert int(ex.input_ids.max()) < tok.get_vocab_size() and int(ex.labels.max()) < tok.get_vocab_size()
    targets = ex.labels[ex.loss_mask.bool()].tolist()
    assert any(tok.id_to_token(t) not in special.tokens.values() for t in targets)  # real text is predicted
    torch.manual_seed(0)
    model = build_model(cfg.model)
    loss = sum(s / ex.target_counts()[t] for t, s in loss_sums(model(**ex.model_inputs()), ex).items())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
