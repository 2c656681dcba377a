"""Tests for `prunecore.evaluate`: exact metrics, clear errors, no mutation, BatchNorm re-estimation."""

from __future__ import annotations

import math
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from prunecore.evaluate import evaluate, list_metrics, recalibrate_bn_


class Lookup(nn.Module):
    """A "model" whose logits we control: input i (a sample index) -> row i of `table`."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]  # (B, C)


def batched(*tensors: torch.Tensor, size: int) -> list[Any]:
    """Split tensors along dim 0 into batches of `size` (the last one shorter), as tuples."""
    return list(zip(*(t.split(size) for t in tensors)))


def conv_bn(dropout: float = 0.0) -> nn.Sequential:
    """Conv -> (Dropout) -> BN -> ReLU -> pool -> Linear, in float64 so statistics compare tightly."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Dropout(dropout), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5),
    ).double()


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# ---------------------------------------------------------------- metrics


def test_registry_lists_the_metrics() -> None:
    assert list_metrics() == ["accuracy", "agreement", "kl", "loss", "perplexity"]


def test_sequence_logits_are_scored_per_token() -> None:
    """A language model's (B, T, V) logits and (B, T) next-token targets: every token is a sample."""
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 0.0]]])  # (2, 2, 2)
    targets = torch.tensor([[0, 1], [1, 0]])  # right, right, wrong, a tie (argmax 0: right)

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits[: x.shape[0]]

    out = evaluate(Fixed(), [(torch.zeros(2, 2, dtype=torch.long), targets)], metric=["accuracy", "loss", "perplexity"])
    ce = torch.nn.functional.cross_entropy(logits.reshape(4, 2).double(), targets.reshape(4)).item()
    assert out["accuracy"] == 0.75
    assert out["loss"] == pytest.approx(ce, rel=1e-12)
    assert out["perplexity"] == pytest.approx(math.exp(ce), rel=1e-12)


def test_accuracy_and_loss_by_hand() -> None:
    table = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    targets = torch.tensor([0, 1, 1])  # the third sample is wrong
    data = batched(torch.arange(3), targets, size=2)  # batches of 2 and 1
    result = evaluate(Lookup(table), data, metric=["accuracy", "loss"])
    loss = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(3))) / 3
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["loss"] == pytest.approx(loss)


def test_uneven_batches_weighted_by_samples_not_batch_means() -> None:
    torch.manual_seed(1)
    table, targets = torch.randn(7, 4), torch.randint(0, 4, (7,))
    targets[6] = table[6].argmax()  # the lone last batch is right: a mean of batch means would differ
    data = batched(torch.arange(7), targets, size=3)  # 3, 3, 1
    result = evaluate(Lookup(table), data, metric=("accuracy", "loss"))
    accuracy = (table.argmax(1) == targets).double().mean().item()
    assert result == pytest.approx({"accuracy": accuracy, "loss": F.cross_entropy(table.double(), targets).item()})
    batch_means = sum((table[i].argmax(1) == targets[i]).double().mean() for i in torch.arange(7).split(3)) / 3
    assert result["accuracy"] != pytest.approx(batch_means.item())


def test_dataloader_and_batches_limit() -> None:
    torch.manual_seed(2)
    table, targets = torch.randn(10, 3), torch.randint(0, 3, (10,))
    loader = DataLoader(TensorDataset(torch.arange(10), targets), batch_size=4)
    model = Lookup(table)
    assert evaluate(model, loader, "loss")["loss"] == pytest.approx(F.cross_entropy(table, targets).item())
    first = evaluate(model, loader, "loss", batches=1)["loss"]
    assert first == pytest.approx(F.cross_entropy(table[:4], targets[:4]).item())


def test_kl_and_agreement_against_itself() -> None:
    torch.manual_seed(3)
    model = Lookup(torch.randn(9, 5))
    result = evaluate(model, torch.arange(9).split(4), metric=["kl", "agreement"], reference=model)
    assert result["kl"] == pytest.approx(0.0, abs=1e-12)
    assert result["agreement"] == 1.0


@pytest.mark.parametrize("wrap", [lambda x: x, lambda x: (x,)], ids=["tensor", "1-tuple"])
def test_kl_and_agreement_match_torch_on_concatenated_outputs(wrap: Any) -> None:
    torch.manual_seed(4)
    dense, pruned = torch.randn(11, 6), torch.randn(11, 6)
    data = [wrap(x) for x in torch.arange(11).split(4)]  # 4, 4, 3; no labels
    result = evaluate(Lookup(pruned), data, metric=["kl", "agreement"], reference=Lookup(dense))
    kl = F.kl_div(F.log_softmax(pruned.double(), 1), F.log_softmax(dense.double(), 1), reduction="batchmean",
                  log_target=True)
    assert result["kl"] == pytest.approx(kl.item(), rel=1e-12)
    assert result["kl"] > 0
    assert result["agreement"] == pytest.approx((pruned.argmax(1) == dense.argmax(1)).double().mean().item())


@pytest.mark.parametrize("name", list_metrics())
def test_every_metric_returns_a_float(name: str) -> None:
    torch.manual_seed(5)
    data = batched(torch.arange(6), torch.randint(0, 3, (6,)), size=4)
    result = evaluate(Lookup(torch.randn(6, 3)), data, metric=name, reference=Lookup(torch.randn(6, 3)))
    assert list(result) == [name] and isinstance(result[name], float) and math.isfinite(result[name])


def test_model_without_parameters_runs_on_cpu() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert evaluate(nn.Identity(), [(logits, torch.tensor([0, 0]))])["accuracy"] == 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_data_moves_to_the_model_device() -> None:
    table, targets = torch.randn(5, 3), torch.randint(0, 3, (5,))
    result = evaluate(Lookup(table).cuda(), batched(torch.arange(5), targets, size=2), "loss",
                      reference=Lookup(table))
    assert result["loss"] == pytest.approx(F.cross_entropy(table.double(), targets).item())
    kl = evaluate(Lookup(table).cuda(), torch.arange(5).split(2), "kl", reference=Lookup(table))["kl"]
    assert kl == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- errors


def test_unknown_metric_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="top5.*accuracy, agreement, kl, loss"):
        evaluate(Lookup(torch.randn(2, 2)), [torch.arange(2)], metric=["accuracy", "top5"])


def test_label_metric_on_unlabelled_data() -> None:
    with pytest.raises(ValueError, match="accuracy.*labels"):
        evaluate(Lookup(torch.randn(2, 2)), [torch.arange(2)], metric="accuracy")


def test_reference_metric_without_reference() -> None:
    with pytest.raises(ValueError, match="kl.*reference"):
        evaluate(Lookup(torch.randn(2, 2)), [torch.arange(2)], metric="kl")


@pytest.mark.parametrize("data, batches", [([], None), ([torch.arange(2)], 0)], ids=["empty", "batches=0"])
def test_empty_data(data: list[Any], batches: int | None) -> None:
    with pytest.raises(ValueError, match="empty"):
        evaluate(Lookup(torch.randn(2, 2)), data, metric="kl", reference=Lookup(torch.randn(2, 2)), batches=batches)


# ---------------------------------------------------------------- no mutation


def test_evaluate_restores_flags_and_leaves_state_untouched() -> None:
    model, reference = conv_bn(dropout=0.5), conv_bn()
    model.train()
    model[1].eval()  # mixed flags must come back exactly, not as a blanket train()
    reference.train()
    before, ref_before = (flags(model), flags(reference)), (state(model), state(reference))
    data = batched(torch.randn(5, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (5,)), size=2)
    evaluate(model, data, metric=list_metrics(), reference=reference)
    assert (flags(model), flags(reference)) == before
    assert_same_state(model, ref_before[0])
    assert_same_state(reference, ref_before[1])


def test_evaluate_runs_in_eval_mode() -> None:
    model = conv_bn(dropout=0.9).train()
    x, y = torch.randn(6, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (6,))
    with torch.no_grad():
        expected = F.cross_entropy(model.eval()(x), y).item()
    model.train()
    assert evaluate(model, [(x, y)], "loss")["loss"] == pytest.approx(expected)


def test_flags_restored_after_an_error() -> None:
    model = conv_bn().train()
    with pytest.raises(RuntimeError):
        evaluate(model, [(torch.randn(2, 7, 6, 6, dtype=torch.float64), torch.tensor([0, 1]))])  # wrong channels
    assert all(flags(model).values())


# ---------------------------------------------------------------- recalibrate_bn_


def conv_batches(n: int = 4, size: int = 8) -> list[torch.Tensor]:
    torch.manual_seed(6)
    return [torch.randn(size, 3, 6, 6, dtype=torch.float64) * (i + 1) + i for i in range(n)]


def expected_stats(conv: nn.Module, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Average over batches of the per-batch channel mean and unbiased variance of the conv output."""
    with torch.no_grad():
        outs = [conv(x).transpose(0, 1).flatten(1) for x in batches]  # (C, B*H*W) each
    return torch.stack([o.mean(1) for o in outs]).mean(0), torch.stack([o.var(1) for o in outs]).mean(0)


def test_recalibration_gives_the_exact_average_of_batch_statistics() -> None:
    model, batches = conv_bn(), conv_batches()
    bn = model[2]
    bn.running_mean.fill_(7.0)  # stale statistics that must be discarded
    model.eval()
    assert recalibrate_bn_(model, batches) is model
    mean, var = expected_stats(model[0], batches)
    assert_close(bn.running_mean, mean)
    assert_close(bn.running_var, var)
    assert bn.num_batches_tracked.item() == len(batches)
    assert bn.momentum == 0.3
    assert not any(flags(model).values())


def test_recalibration_is_independent_of_order_and_labels() -> None:
    batches = conv_batches()
    forward = recalibrate_bn_(conv_bn(), batches)[2]
    labelled = [(x, torch.zeros(len(x), dtype=torch.long)) for x in reversed(batches)]
    backward = recalibrate_bn_(conv_bn(), labelled)[2]
    assert_close(forward.running_mean, backward.running_mean)
    assert_close(forward.running_var, backward.running_var)


def test_recalibration_keeps_dropout_off() -> None:
    model, batches = conv_bn(dropout=0.99).train(), conv_batches()
    recalibrate_bn_(model, batches)
    mean, var = expected_stats(model[0], batches)
    assert_close(model[2].running_mean, mean)
    assert_close(model[2].running_var, var)
    assert all(flags(model).values())


def test_recalibration_batches_limit() -> None:
    model, batches = conv_bn(), conv_batches()
    recalibrate_bn_(model, iter(batches), batches=2)
    mean, _ = expected_stats(model[0], batches[:2])
    assert_close(model[2].running_mean, mean)
    assert model[2].num_batches_tracked.item() == 2


def never_iterated() -> Iterator[torch.Tensor]:
    raise AssertionError("data must not be touched")
    yield torch.zeros(0)


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)),
    nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2, track_running_stats=False)),
], ids=["no-bn", "untracked-bn"])
def test_model_without_tracked_bn_is_unchanged(model: nn.Module) -> None:
    before, before_flags = state(model), flags(model)
    assert recalibrate_bn_(model, never_iterated()) is model
    assert_same_state(model, before)
    assert flags(model) == before_flags


@pytest.mark.parametrize("n, batches", [(0, 50), (4, 0)], ids=["empty", "batches=0"])
def test_recalibration_without_batches_fails_and_keeps_statistics(n: int, batches: int) -> None:
    model, data = conv_bn(), conv_batches(n)
    model[2].running_mean.fill_(3.0)
    before = state(model)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn_(model, data, batches=batches)
    assert_same_state(model, before)


def test_recalibration_error_midway_restores_statistics_and_momentum() -> None:
    model = conv_bn()
    model[2].running_var.fill_(2.0)
    before = state(model)
    bad = [conv_batches()[0], torch.randn(2, 7, 6, 6, dtype=torch.float64)]  # second batch: wrong channels
    with pytest.raises(RuntimeError):
        recalibrate_bn_(model, bad)
    assert_same_state(model, before)
    assert model[2].momentum == 0.3
    assert all(flags(model).values())
