"""The warm-start levers of train.py on a tiny model: class-balanced replay, a lower backbone
learning rate, distillation from the warm-start model (issue #10)."""

from __future__ import annotations

import pytest
import torch
import train
from torch import nn

from sku_jobs.data import Sample, select_replay
from sku_jobs.model import DEFAULT_FREEZE, build_model


def samples(counts: dict[int, int]) -> list[Sample]:
    return [Sample(f"c{c}/{i}.jpg", c, f"SKU-{c}", f"{c:02d}{i:062d}") for c, n in counts.items() for i in range(n)]


def test_balanced_replay_spends_the_budget_as_an_equal_quota_per_old_class():
    data = samples({0: 100, 1: 20, 2: 4, 3: 30, 4: 10})  # classes 0-2 old, 3-4 new
    old_total = 124
    proportional = select_replay(data, 3, 0.3, seed=0)
    balanced = select_replay(data, 3, 0.3, seed=0, balanced=True)

    def per_class(items):
        return {c: sum(1 for s in items if s.class_index == c) for c in range(5)}

    assert per_class(proportional) == {0: 30, 1: 6, 2: 2, 3: 30, 4: 10}
    quota = -(-int(0.3 * old_total * 10) // 30)  # ceil(0.3 * 124 / 3) = 13
    assert per_class(balanced) == {0: quota, 1: quota, 2: 4, 3: 30, 4: 10}  # class 2 gives all it has
    assert select_replay(data, 3, 0.3, seed=0, balanced=True) == balanced  # deterministic
    assert select_replay(data, 3, 0.3, seed=1, balanced=True) != balanced  # seeded
    assert select_replay(data, 3, 1.0, balanced=True) == data


def test_backbone_learning_rate_is_a_multiple_of_the_heads():
    model = build_model("resnet18", 5, head_hidden=8, freeze=DEFAULT_FREEZE)
    groups = train._param_groups(model, 1e-4, lr=0.5, backbone_lr_mult=0.1)
    head = {id(p) for p in model.head.parameters()}
    for g in groups:
        in_head = {id(p) in head for p in g["params"]}
        assert len(in_head) == 1
        assert g["lr"] == (0.5 if in_head.pop() else pytest.approx(0.05))
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}  # frozen ones left out
    assert all(not p.requires_grad for p in model.backbone.layer3.parameters())


def test_distillation_pulls_the_old_logits_towards_the_teacher():
    torch.manual_seed(0)
    teacher = nn.Linear(6, 3)  # 3 old classes
    student = nn.Linear(6, 5)  # widened to 5
    x = torch.randn(16, 6)
    y = torch.randint(0, 5, (16,))
    ce = nn.CrossEntropyLoss()
    off = train.DistillationLoss(ce, teacher, weight=0.0, temperature=2.0)
    assert torch.allclose(off(student(x), y, x), ce(student(x), y))
    # A student whose old rows are the teacher's: nothing to distil.
    with torch.no_grad():
        student.weight[:3] = teacher.weight
        student.bias[:3] = teacher.bias
    kd = train.DistillationLoss(ce, teacher, weight=1.0, temperature=2.0)
    assert torch.allclose(kd(student(x), y, x), ce(student(x), y), atol=1e-6)
    # Move the student's old rows away: the distillation term grows, and its gradient leads back.
    with torch.no_grad():
        student.weight[:3] += torch.randn(3, 6)
    gap = kd(student(x), y, x) - ce(student(x), y)
    assert gap > 0
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        (kd(student(x), y, x) - ce(student(x), y)).backward()
        opt.step()
    assert kd(student(x), y, x) - ce(student(x), y) < 0.5 * gap
    assert all(not p.requires_grad for p in teacher.parameters())
