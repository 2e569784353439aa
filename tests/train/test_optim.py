"""Optimizers and learning-rate schedules: each optimizer learns, decay skips 1-D params, schedules hit their marks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.train.optim import build_optimizer, lr_at

LRS = {"adamw": 0.2, "adam": 0.2, "rmsprop": 0.01, "sgd": 0.05}


def regression() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """y = Xw + b exactly, for a Linear(4, 1) starting from a fixed random point."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5], [3.0]]) + 0.7
    torch.manual_seed(0)
    return nn.Linear(4, 1), x, y


@pytest.mark.parametrize("name", LRS)
def test_one_step_changes_every_parameter(name: str) -> None:
    """A single optimizer step moves both the weight matrix and the bias."""
    model, x, y = regression()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(model, name, LRS[name], weight_decay=0.0)
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    for old, new in zip(before, model.parameters()):
        assert not torch.equal(old, new)


@pytest.mark.parametrize("name", LRS)
def test_twenty_steps_lower_the_loss(name: str) -> None:
    """20 full-batch steps on a linear regression cut the mean squared error to under a quarter."""
    model, x, y = regression()
    optimizer = build_optimizer(model, name, LRS[name], weight_decay=0.01)
    with torch.no_grad():
        first = F.mse_loss(model(x), y).item()
    for _ in range(20):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        last = F.mse_loss(model(x), y).item()
    assert last < 0.25 * first


def test_weight_decay_applies_to_matrices_only() -> None:
    """Linear weight matrices get the weight decay; biases and norm scales/shifts get none."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.RMSNorm(8))
    optimizer = build_optimizer(model, "adamw", 1e-3, weight_decay=0.1)
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay == {id(model[0].weight), id(model[1].weight)}
    assert no_decay == {id(model[0].bias), id(model[1].bias), id(model[2].weight), id(model[2].bias),
                        id(model[3].weight)}


def test_frozen_parameters_are_left_out() -> None:
    """Parameters with requires_grad=False are in no group; a model with none trainable is a ConfigError."""
    model = nn.Linear(4, 4)
    model.bias.requires_grad_(False)
    optimizer = build_optimizer(model, "adamw")
    assert [p for g in optimizer.param_groups for p in g["params"]] == [model.weight]
    model.weight.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model, "adamw")


def test_unknown_optimizer_is_a_config_error() -> None:
    """An optimizer name outside adamw/adam/rmsprop/sgd raises ConfigError naming it."""
    with pytest.raises(ConfigError, match="optimizer='lion'"):
        build_optimizer(nn.Linear(2, 2), "lion")  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_to_peak(schedule: str) -> None:
    """Over `warmup` steps the rate is peak·(step+1)/warmup, reaching the peak on the last warmup step."""
    lrs = [lr_at(s, peak=2.0, warmup=10, total=100, schedule=schedule) for s in range(10)]
    assert lrs == pytest.approx([2.0 * (s + 1) / 10 for s in range(10)])
    assert lr_at(10, peak=2.0, warmup=10, total=100, schedule=schedule) == pytest.approx(2.0)


def test_cosine_decays_to_min_ratio_of_peak_at_total_and_stays() -> None:
    """Cosine: peak right after warmup, (1+min_ratio)/2·peak half way, min_ratio·peak at `total` and after."""
    kw = dict(peak=1.0, warmup=10, total=110, schedule="cosine", min_ratio=0.1)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_linear_schedule_is_half_way_between_peak_and_floor_at_mid_point() -> None:
    """Linear decay: at the middle of the decay phase the rate is peak·(1+min_ratio)/2, and min_ratio·peak at total."""
    kw = dict(peak=3.0, warmup=10, total=110, schedule="linear", min_ratio=0.2)
    assert lr_at(60, **kw) == pytest.approx(3.0 * 0.6)
    assert lr_at(35, **kw) == pytest.approx(3.0 * (1 - 0.8 * 0.25))
    assert lr_at(110, **kw) == pytest.approx(3.0 * 0.2)


def test_constant_schedule_stays_at_peak() -> None:
    """After warmup a constant schedule never leaves the peak, past `total` included."""
    assert {lr_at(s, peak=0.5, warmup=5, total=50, schedule="constant") for s in range(5, 200)} == {0.5}


def test_unknown_total_stays_at_peak_after_warmup() -> None:
    """A run bounded only by time (total=None) holds the peak rate after warmup, whatever the schedule."""
    assert lr_at(10_000, peak=0.5, warmup=5, total=None, schedule="cosine") == 0.5


def test_unknown_schedule_is_a_config_error() -> None:
    """A schedule outside cosine/linear/constant raises ConfigError once warmup is over."""
    with pytest.raises(ConfigError, match="schedule='step'"):
        lr_at(20, peak=1.0, warmup=5, total=50, schedule="step")  # type: ignore[arg-type]


def test_cosine_follows_the_closed_form() -> None:
    """Every post-warmup step equals min + (peak−min)·½(1+cos(π·progress)) (Loshchilov & Hutter 2017)."""
    peak, floor, warmup, total = 1.0, 0.1, 4, 24
    for s in range(warmup, total + 1):
        progress = (s - warmup) / (total - warmup)
        expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_at(s, peak=peak, warmup=warmup, total=total, min_ratio=floor) == pytest.approx(expected)


def test_time_bounded_run_decays_over_its_budget() -> None:
    """With `progress` (fraction of a time budget) the cosine follows it, whatever the step count."""
    kwargs = dict(peak=1.0, warmup=10, total=None, schedule="cosine", min_ratio=0.1)
    assert lr_at(5, **kwargs, progress=0.9) == pytest.approx(0.6)  # warmup still comes first
    assert lr_at(500, **kwargs, progress=0.0) == pytest.approx(1.0)
    assert lr_at(500, **kwargs, progress=0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(500, **kwargs, progress=1.5) == pytest.approx(0.1)
    assert lr_at(500, **kwargs) == 1.0  # neither a total nor a budget: stay at peak
