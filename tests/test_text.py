"""Text data for language models: exact blocks, tokenizers, clear errors, and sweeps on an HF decoder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import hf_zoo  # noqa: E402

import prunecore as pc  # noqa: E402
from prunecore.datasets import DataSpecError, load_data, load_train  # noqa: E402
from prunecore.text import TextError, load_text, load_tokenizer, read_documents  # noqa: E402

PROSE = "The quick brown fox jumps over the lazy dog. " * 20  # 900 bytes


def test_blocks_are_the_file_in_order_with_next_token_targets(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text(PROSE)
    blocks = load_text(path, length=16)
    raw = torch.tensor(list(PROSE.encode()))
    assert len(blocks) == (raw.numel() - 1) // 16
    for i in (0, 1, len(blocks) - 1):
        inputs, targets = blocks[i]
        assert torch.equal(inputs, raw[i * 16: i * 16 + 16])
        assert torch.equal(targets, raw[i * 16 + 1: i * 16 + 17])
    assert len(load_text(path, length=16, limit=3)) == 3


def test_jsonl_documents_are_joined_by_a_blank_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "alpha"}\n\n"beta"\n{"text": "gamma", "id": 3}\n')
    assert read_documents(path) == ["alpha", "beta", "gamma"]
    blocks = load_text(path, length=4)
    stream = bytes(torch.cat([blocks.blocks[:, :-1].reshape(-1), blocks.blocks[-1:, -1]]).tolist()).decode()
    assert "alpha\n\nbeta\n\ngamma".startswith(stream)


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b'{"text": "ok"}\n{broken\n', "line 2 is not JSON"),
    (b'{"title": "no text"}\n', "line 1 has no text"),
    (b'"short"', "too short for one block"),
])  # fmt: skip
def test_bad_text_gets_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(TextError, match=message):
        load_text(path, length=64)


def test_missing_file_and_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(TextError, match="does not exist"):
        load_text(tmp_path / "nope.txt", length=8)
    with pytest.raises(TextError, match="missing tokenizer: model folder .* has no tokenizer.json"):
        load_tokenizer(tmp_path)


def _word_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer.json over the words of PROSE (built offline with the tokenizers library)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(PROSE.replace(".", " .").split()))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_hf_folder_tokenizer_is_used_and_checked_against_the_vocabulary(tmp_path: Path) -> None:
    model, _ = hf_zoo.build("llama")  # vocabulary of 100 ids
    folder = _word_tokenizer(tmp_path / "model")
    model.save_pretrained(folder)
    text = tmp_path / "a.txt"
    text.write_text(PROSE.replace(".", " ."))
    data = load_data(f"text:{text}", input_shape=(1, 8), model=f"hf:{folder}")
    inputs, targets = next(iter(data.evaluation))
    assert inputs.shape[1] == 8 and int(inputs.max()) <= 10  # word ids, not bytes
    assert "tokenizer" in data.description and data.labelled
    # bytes go up to 'z' = 122, past the model's 100 ids: refused, naming the cause
    with pytest.raises(DataSpecError, match="vocabulary has 100 ids"):
        load_data(f"text:{text}", input_shape=(1, 8), model=f"hf:{folder}(tokenizer='byte')")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(DataSpecError, match="missing tokenizer"):
        load_data(f"text:{text}", input_shape=(1, 8), model=f"hf:{folder}")


def test_text_needs_a_token_model(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text(PROSE)
    with pytest.raises(DataSpecError, match="input is \\(batch, tokens\\)"):
        load_data(f"text:{text}", input_shape=(1, 3, 32, 32))


def test_sample_spec_gives_the_sample_text_for_a_token_model() -> None:
    data = load_data("sample", input_shape=(1, 32), limit=5)
    inputs, targets = next(iter(data.evaluation))
    assert inputs.shape == (5, 32) and inputs.dtype == torch.long
    assert torch.equal(inputs[0, 1:], targets[0, :-1])
    held = bytes(inputs.reshape(-1).tolist()).decode("utf-8", errors="replace")
    train = load_train("sample", input_shape=(1, 32))
    train_text = b"".join(bytes(b[0].tolist()) for b in train.loader.dataset).decode("utf-8", errors="replace")
    assert held[:64] not in train_text  # held-out topics are never trained on


def test_perplexity_sweep_and_plan_on_a_decoder(tmp_path: Path) -> None:
    """A sweep of a GQA decoder on text blocks: exact points, perplexity = exp(loss), a plan that meets its budget."""
    model, x = hf_zoo.build("llama")
    text = tmp_path / "a.txt"
    text.write_text(PROSE)
    blocks = torch.utils.data.DataLoader(load_text(text, length=12), batch_size=8)
    clipped = [(i % 100, t % 100) for i, t in blocks]  # bytes folded into the tiny model's 100 ids
    graph = pc.trace(model, x)
    curves = pc.sweep(model, clipped, x, levels=(0.5,), metric=["loss", "perplexity"], graph=graph, progress=False)
    for row in curves.itertuples():
        assert row.perplexity == pytest.approx(math.exp(row.loss), rel=1e-9)
    group = "model.layers.0.mlp.gate_proj"
    point = curves[(curves.group == group) & (curves.sparsity == 0.5)].iloc[0]
    pruned = pc.apply_plan(model, pc.make_plan(model, graph, {group: 0.5}), graph=graph)
    assert pc.evaluate(pruned, clipped, ["loss"])["loss"] == pytest.approx(point.loss, rel=1e-6)
    plan = pc.allocate(curves, graph, pc.Budget(flops=0.8), method="greedy", model=model, metric="perplexity")
    measured = pc.count(pc.apply_plan(model, plan, graph=graph), x).flops / pc.count(model, x).flops
    assert measured <= 0.8 + 1e-9


def test_jsonl_from_the_cli_spec_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": PROSE[i: i + 100]}) for i in range(0, 800, 100)))
    data = load_data(f"text:{path}", input_shape=(1, 16), limit=4)
    assert sum(b[0].shape[0] for b in data.evaluation) == 4


def test_cli_sweeps_allocates_and_saves_an_hf_decoder_on_text(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The command line on an `hf:` folder with its own tokenizer and a text file, through save_pretrained."""
    from prunecore.cli import main

    model, _ = hf_zoo.build("llama")
    folder = _word_tokenizer(tmp_path / "model")
    model.save_pretrained(folder)
    text = tmp_path / "a.txt"
    text.write_text(PROSE.replace(".", " ."))
    spec, store = f"hf:{folder}", tmp_path / "runs.db"
    common = ["--model", spec, "--input", "1,8", "--store", str(store)]
    assert main(["sweep", *common, "--data", f"text:{text}", "--levels", "0.5", "--metric", "perplexity,loss"]) == 0
    assert "perplexity" in capsys.readouterr().out
    plan = tmp_path / "plan.json"
    # dp on its own would cut layers differently; --statable keeps one count per layer and the width
    assert main(["allocate", *common, "--budget", "flops=0.8", "--method", "dp", "--statable", "--out",
                 str(plan)]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert "2 set(s) of groups kept at one fraction (2 groups of 2 units, 2 groups of 128 units); 1 group(s) kept " \
        "dense" in said  # fmt: skip
    out = tmp_path / "pruned"
    assert main(["apply", str(plan), "--model", spec, "--out", str(tmp_path / "p.pt"), "--save-pretrained",
                 str(out)]) == 0  # fmt: skip
    assert "from_pretrained reads it" in capsys.readouterr().out
    again = type(model).from_pretrained(out)
    assert again.config.intermediate_size < model.config.intermediate_size
    pruned, _ = pc.load_pruned(tmp_path / "p.pt", model=spec)  # prunecore's own file rebuilds it too
    x = torch.randint(0, 10, (1, 8))
    with torch.no_grad():
        assert torch.equal(again(x).logits, pruned(x).logits)
