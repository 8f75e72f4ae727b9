"""Fast tests of the training job's model code: budget, freezing, widening, artefact, metric lines."""

from __future__ import annotations

import re

import pytest
import torch

from sku_contracts import metrics
from sku_jobs.model import (
    DEFAULT_FREEZE,
    INIT_IMAGENET,
    INIT_RANDOM,
    INIT_WARM_START,
    build_model,
    cosine_warmup_lambda,
    count_parameters,
    load_model_artifact,
    resolve_freeze,
    save_model_artifact,
    widen_head,
)


def _build_meta(*args, **kwargs):
    # The meta device allocates nothing: resnet152 @ 12,000 classes costs no memory here.
    with torch.device("meta"):
        return build_model(*args, **kwargs)


def test_parameter_budget_resnet152_12000_classes():
    """The source report's budget: 66M total, 23M trainable (layer4 15.0M + head ~8.1M)."""
    model = _build_meta("resnet152", num_classes=12_000, head_hidden=576, freeze=DEFAULT_FREEZE)
    total, trainable = count_parameters(model)
    assert abs(total - 66_000_000) <= 1_000_000, total
    assert abs(trainable - 23_000_000) <= 1_000_000, trainable
    # The parts, exactly: frozen stem + layer1-3, trainable layer4 + head.
    layer4 = sum(p.numel() for p in model.backbone.layer4.parameters())
    head = (2048 * 576 + 576) + (576 * 12_000 + 12_000)
    assert trainable == layer4 + head
    assert abs((total - trainable) - 43_200_000) <= 100_000
    assert abs(layer4 - 15_000_000) <= 100_000


def test_freezing_selects_trainable_params_and_keeps_frozen_bn_in_eval():
    model = build_model("resnet18", num_classes=7, head_hidden=32, freeze=DEFAULT_FREEZE)
    assert model.frozen == DEFAULT_FREEZE
    trainable = {n.split(".")[1] if n.startswith("backbone.") else n.split(".")[0]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "head"}
    model.train()
    for name in DEFAULT_FREEZE:
        assert not getattr(model.backbone, name).training, name
    assert model.backbone.layer4.training and model.head.training
    # Frozen BN running stats do not move in a training forward pass.
    before = model.backbone.layer1[0].bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(before, model.backbone.layer1[0].bn1.running_mean)


def test_default_head_is_one_classifier_on_the_pooled_features():
    """torchvision's own shape (``fc``): the pipeline's model is the hand-trained reference's."""
    model = build_model("resnet18", num_classes=5).eval()
    assert [type(m).__name__ for m in model.head] == ["Dropout", "Linear"]
    assert model.classifier.in_features == 512 and model.head[0].p == 0.0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.embed(x), model.backbone(x))
        assert torch.allclose(model(x), model.classifier(model.backbone(x)))
    with pytest.raises(ValueError, match="head_hidden"):
        build_model("resnet18", num_classes=5, head_hidden=-1)


def test_random_init_model_freezes_nothing_by_default():
    model = build_model("resnet18", num_classes=3, head_hidden=8)
    assert model.frozen == () and count_parameters(model)[0] == count_parameters(model)[1]


@pytest.mark.parametrize(
    ("spec", "init", "frozen", "words"),
    [
        ("auto", INIT_RANDOM, (), "nothing frozen: random init"),
        ("auto", INIT_IMAGENET, DEFAULT_FREEZE, "frozen: conv1,bn1,layer1,layer2,layer3 (loaded from ImageNet weights"),
        ("auto", INIT_WARM_START, DEFAULT_FREEZE, "(loaded from the warm-start model"),
        ("none", INIT_IMAGENET, (), "nothing frozen: loaded from ImageNet weights"),
        ("", INIT_WARM_START, (), "nothing frozen"),
        ("conv1,layer1", INIT_IMAGENET, ("conv1", "layer1"), "frozen: conv1,layer1"),
        ("layer1", INIT_RANDOM, ("layer1",), "WARNING: these layers stay at random init"),
    ],
)
def test_freeze_policy_follows_the_weights_loaded(spec, init, frozen, words):
    names, line = resolve_freeze(spec, init)
    assert names == frozen
    assert words in line, line


def test_freeze_policy_rejects_unknown_init():
    with pytest.raises(ValueError, match="backbone init"):
        resolve_freeze("auto", "imagenet21k")


def test_freeze_nothing_and_unknown_module():
    model = build_model("resnet18", num_classes=3, head_hidden=8, freeze="")
    total, trainable = count_parameters(model)
    assert total == trainable
    with pytest.raises(ValueError, match="layer9"):
        build_model("resnet18", num_classes=3, head_hidden=8, freeze="layer9")


@pytest.mark.parametrize("head_hidden", [16, 0], ids=["bottleneck-head", "single-classifier"])
def test_widen_head_keeps_old_logits_and_imprints_new_rows(head_hidden):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=4, head_hidden=head_hidden).eval()
    width = head_hidden or 512  # the classifier reads the hidden layer, or resnet18's pooled features
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        emb = model.embed(x[:1])[0]
    old_w = model.classifier.weight.detach().clone()
    new_ids = widen_head(model, 7, {4: emb, 5: emb * 2}, torch.Generator().manual_seed(0))
    assert new_ids == [4, 5, 6]
    assert model.num_classes == 7 and model.classifier.weight.shape == (7, width)
    assert model.classifier is model.head[-1]
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(after[:, :4], before, atol=1e-6)
    w = model.classifier.weight.detach()
    mean_norm = old_w.norm(dim=1).mean()
    # Imprinted rows: the embedding's direction at the old rows' mean norm.
    for cls in (4, 5):
        assert torch.allclose(w[cls].norm(), mean_norm, rtol=1e-5)
        assert torch.allclose(w[cls] / w[cls].norm(), emb / emb.norm(), atol=1e-5)
    assert torch.allclose(model.classifier.bias[4:].detach(), model.classifier.bias[:4].detach().mean().expand(3))
    assert 0 < float(w[6].norm()) < float(mean_norm)  # small random fallback
    assert model.classifier.weight.requires_grad
    with pytest.raises(ValueError, match="shrink"):
        widen_head(model, 5)


def test_widen_head_with_reference_is_neutral_at_the_reference():
    """Centred imprinting: at the old-class mean, a new class scores the mean old logit."""
    torch.manual_seed(2)
    model = build_model("resnet18", num_classes=3, head_hidden=8).eval()
    old_w = model.classifier.weight.detach().clone()
    old_b = model.classifier.bias.detach().clone()
    ref = torch.rand(8)
    emb = ref + torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])
    widen_head(model, 5, {3: emb}, torch.Generator().manual_seed(0), reference=ref)
    w, b = model.classifier.weight.detach(), model.classifier.bias.detach()
    assert torch.equal(w[:3], old_w) and torch.equal(b[:3], old_b)
    mean_old_logit = (old_w @ ref + old_b).mean()
    for cls in (3, 4):  # imprinted and random-fallback rows alike
        assert torch.allclose(w[cls] @ ref + b[cls], mean_old_logit, atol=1e-5)
    assert torch.allclose(w[3] / w[3].norm(), torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]), atol=1e-6)
    # Closer to the new class's mean than the reference is → a higher logit for it.
    assert w[3] @ emb + b[3] > w[3] @ ref + b[3]


@pytest.mark.parametrize("head_hidden", [8, 0])
def test_model_artifact_round_trip(tmp_path, head_hidden):
    torch.manual_seed(1)
    model = build_model("resnet18", num_classes=3, head_hidden=head_hidden, dropout=0.1).eval()
    classes = ["SKU-A", "SKU-B", "SKU-C"]
    path = save_model_artifact(model, tmp_path / "model.pt", image_size=64, classes=classes, extra={"best": {"epoch": 2}})
    assert not list(tmp_path.glob("*.tmp*"))
    loaded, meta = load_model_artifact(path)
    assert meta["arch"] == "resnet18" and meta["num_classes"] == 3 and meta["classes"] == classes
    assert meta["image_size"] == 64 and meta["head_hidden"] == head_hidden and meta["best"] == {"epoch": 2}
    assert meta["dropout"] == 0.1 and len(loaded.head) == len(model.head)
    assert meta["torch_version"] == str(torch.__version__)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    with pytest.raises(ValueError, match="class names"):
        save_model_artifact(model, tmp_path / "bad.pt", image_size=64, classes=["only-one"])


def test_metric_lines_match_metric_definitions():
    line = metrics.format_epoch_line(3, 1.23456, 0.98765, 0.8123, 0.97119, 0.0125, 812.34)
    assert line == ("METRIC epoch=3 train_loss=1.2346 val_loss=0.9877 val_top1=0.8123 val_top5=0.9712 "
                    "lr=0.012500 images_per_sec=812.3")
    final = metrics.format_final_line(3, 0.8123, 0.805, 0.96875)
    # SageMaker's mpirun prefix must not stop the regexes from matching.
    log = f"epoch 3 step 1/10 loss 1.0\n[1,mpirank:0,algo-1]<stdout>:{line}\n{final}\n"
    found = metrics.parse_metric_lines(log)
    assert found == {
        "epoch": [3.0], "train:loss": [1.2346], "validation:loss": [0.9877], "validation:top1": [0.8123],
        "validation:top5": [0.9712], "train:lr": [0.0125], "train:images_per_sec": [812.3],
        "best:validation:top1": [0.8123], "test:top1": [0.805], "test:top5": [0.9688],
    }
    names = [d["Name"] for d in metrics.METRIC_DEFINITIONS]
    assert len(names) == len(set(names))
    for d in metrics.METRIC_DEFINITIONS:
        assert set(d) == {"Name", "Regex"} and re.compile(d["Regex"]).groups == 1


def test_metrics_module_is_torch_free():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(metrics))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "re"}


def test_cosine_warmup_schedule():
    f = cosine_warmup_lambda(warmup_steps=4, total_steps=14)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.5)
    assert f(14) == pytest.approx(0.0, abs=1e-9)
