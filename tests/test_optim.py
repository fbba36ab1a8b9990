"""gpt/optim.py: which parameters Muon takes, Muon's update against a reference written from
its definition, the schedule shared by both optimisers, and Muon in training (resume, two
processes, fine-tuning, FSDP refused)."""

import math

import pytest
import torch

import train
from gpt import GPT, GPTConfig
from gpt.checkpoint import load_checkpoint
from gpt.classify import GPTClassifier
from gpt.config import OptimConfig
from gpt.optim import lr_at, make_optimizers, muon_matrices, set_lr

from conftest import fails_with
from test_train import args, run_cli, step_losses, weights

MUON = "--optim.name=muon"


def small_gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, **kw))


def names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = small_gpt(bias=True)
    muon, adamw = make_optimizers(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.05), torch.device("cpu"))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    on_muon = names(model, [p for g in muon.param_groups for p in g["params"]])
    assert on_muon == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert on_muon and all(n.endswith(".weight") for n in on_muon)
    rest = names(model, [p for g in adamw.param_groups for p in g["params"]])
    assert rest == {n for n, _ in model.named_parameters()} - on_muon
    assert "transformer.wte.weight" in rest and any(n.endswith(".bias") for n in rest)
    assert [g["peak_lr"] for g in muon.param_groups] == [0.05] and {g["peak_lr"] for g in adamw.param_groups} == {1e-3}
    set_lr([muon, adamw], 0.5)  # a schedule point halfway down: both optimisers follow it in proportion
    assert [g["lr"] for g in muon.param_groups] == [0.025] and {g["lr"] for g in adamw.param_groups} == {5e-4}


def test_a_classifier_head_stays_with_adamw_and_a_frozen_backbone_leaves_muon_nothing():
    classifier = GPTClassifier(small_gpt(), 3)
    muon, adamw = make_optimizers(classifier, OptimConfig(name="muon"), torch.device("cpu"))
    assert names(classifier, muon.param_groups[0]["params"]) == names(classifier, muon_matrices(classifier))
    assert any(n.startswith("head") for n in names(classifier, [p for g in adamw.param_groups for p in g["params"]]))
    for p in classifier.backbone.parameters():
        p.requires_grad_(False)
    only = make_optimizers(classifier, OptimConfig(name="muon"), torch.device("cpu"))
    assert len(only) == 1 and isinstance(only[0], torch.optim.AdamW)


def newton_schulz(g, steps=5, eps=1e-7):
    """The quintic Newton-Schulz iteration of Muon, from its definition: a matrix with the same
    singular vectors as g and singular values pushed towards 1."""
    a, b, c = 3.4445, -4.775, 2.0315
    x = g / (g.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


def test_muon_updates_equal_the_definition_over_several_steps():
    # torch.optim.Muon keeps its momentum as an average (buf.lerp_(grad, 1 - momentum)): the
    # same direction as the sum below, and Newton-Schulz divides the scale out. It iterates in
    # bfloat16, so the two agree to bf16's precision: within 2% over a whole update (a
    # forgotten shape factor, Nesterov term or weight decay is off by 10% or more)
    model = small_gpt()
    optim = OptimConfig(name="muon", muon_lr=0.03, muon_momentum=0.9, weight_decay=2.0)  # decay shows
    muon = make_optimizers(model, optim, torch.device("cpu"))[0]
    params = muon.param_groups[0]["params"]
    momenta = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for step in range(3):
        before = [p.detach().double().clone() for p in params]
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        muon.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            momenta[i] = 0.9 * momenta[i] + g.double()
            update = newton_schulz(g.double() + 0.9 * momenta[i])  # Nesterov
            rows, cols = g.shape
            expected = before[i] * (1 - 0.03 * 2.0) - 0.03 * math.sqrt(max(1, rows / cols)) * update
            change, expected_change = p.detach().double() - before[i], expected - before[i]
            assert (change - expected_change).norm() < 0.02 * expected_change.norm(), (step, i)
    # what Muon is for: the update's singular values are all near 1 (a semi-orthogonal matrix)
    s = torch.linalg.svdvals(newton_schulz(torch.randn(24, 64, dtype=torch.float64)))
    assert 0.6 < s.min() and s.max() < 1.25


def test_wsd_and_cosine_reach_min_lr_and_warm_up_alike():
    wsd = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=10, schedule="wsd")
    cos = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=10)
    assert [lr_at(i, wsd, 100) for i in range(10)] == [lr_at(i, cos, 100) for i in range(10)]
    assert all(lr_at(i, wsd, 100) == 1.0 for i in range(10, 80))  # stable until the last 20%
    assert lr_at(90, wsd, 100) == pytest.approx(0.55) and lr_at(100, wsd, 100) == pytest.approx(0.1)
    assert lr_at(100, cos, 100) == pytest.approx(0.1) and lr_at(55, cos, 100) == pytest.approx(0.55)


@pytest.fixture
def data_dir(char_data):
    return char_data


def test_muon_trains_and_resumes_bit_exact(data_dir, tmp_path):
    more = ["--optim.muon_lr=0.05", "--model.dropout=0.1"]
    train.main(args(data_dir, tmp_path / "whole", MUON, "--max_iters=12", *more))
    train.main(args(data_dir, tmp_path / "parts", MUON, "--max_iters=5", *more))
    train.main(args(data_dir, tmp_path / "parts", MUON, "--max_iters=12", "--resume", *more))
    whole, parts = step_losses(tmp_path / "whole"), step_losses(tmp_path / "parts")
    assert whole == parts and whole[12] < whole[1] - 0.5  # the momentum buffers came back with the checkpoint
    for name, tensor in weights(tmp_path / "whole").items():
        assert torch.equal(tensor, weights(tmp_path / "parts")[name]), name


def test_an_fp16_overflow_in_adamws_gradients_skips_muons_step_too(data_dir, tmp_path, monkeypatch):
    from gpt.tasks.lm import LanguageModeling

    train.main(args(data_dir, tmp_path / "start", MUON, "--max_iters=0", "--system.dtype=float16"))
    plain_loss = LanguageModeling.loss

    def overflowing(self, model, batch):  # an infinite gradient in the token embeddings only (AdamW's)
        return plain_loss(self, model, batch) + model.transformer.wte.weight[0, 0] * float("inf")

    monkeypatch.setattr(LanguageModeling, "loss", overflowing)
    train.main(args(data_dir, tmp_path / "run", MUON, "--max_iters=2", "--system.dtype=float16"))
    start, after = weights(tmp_path / "start"), weights(tmp_path / "run")
    assert any(n.endswith("attn.c_attn.weight") for n in after)  # Muon's matrices are among them
    for name, tensor in after.items():
        assert torch.equal(tensor, start[name]), name  # no optimizer stepped
    scaler = load_checkpoint(tmp_path / "run" / "ckpt.pt")["scaler"]
    assert scaler["scale"] == 2.0**16 / 4  # halved after each of the two overflows


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_checkpoint_before_the_first_step_resumes_like_an_unbroken_run(optimizer, data_dir, tmp_path):
    """Nothing to save yet: PyTorch's state-dict helpers would make optimizer state by taking a step
    of learning rate 0 (Muon + AdamW), which AdamW counts: the resumed run would differ."""
    more = [f"--optim.name={optimizer}", "--model.dropout=0.1"]
    train.main(args(data_dir, tmp_path / "whole", "--max_iters=4", *more))
    train.main(args(data_dir, tmp_path / "parts", "--max_iters=0", *more))
    assert not load_checkpoint(tmp_path / "parts" / "ckpt.pt")["optimizer"]["state"]
    train.main(args(data_dir, tmp_path / "parts", "--max_iters=4", "--resume", *more))
    assert step_losses(tmp_path / "whole") == step_losses(tmp_path / "parts")
    for name, tensor in weights(tmp_path / "whole").items():
        assert torch.equal(tensor, weights(tmp_path / "parts")[name]), name


def test_muon_under_fsdp_and_an_unknown_optimiser_are_refused(data_dir, tmp_path, capsys):
    fails_with(capsys, args(data_dir, tmp_path / "f", MUON, "--max_iters=2", "--system.parallel=fsdp"),
               'optim.name = "muon" does not run under system.parallel = "fsdp" (Newton-Schulz needs each weight '
               'matrix whole, FSDP holds shards): use system.parallel = "ddp", or optim.name = "adamw"')
    assert not (tmp_path / "f").exists()  # a failed start leaves nothing behind
    fails_with(capsys, args(data_dir, tmp_path / "s", "--optim.name=sgd"),
               "optim.name must be one of adamw, muon, got 'sgd'")


def test_muon_needs_a_torch_that_has_it(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    fails_with(capsys, args(data_dir, tmp_path / "old", MUON, "--max_iters=2"),
               f'optim.name = "muon" needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}: '
               f'upgrade torch, or train with optim.name = "adamw"')


def test_muon_fine_tunes_a_classifier(tmp_path):
    from test_classify import args as classify_args, evals, sms_slice

    data = sms_slice(tmp_path, 300)
    train.main(classify_args(data, tmp_path / "clf", MUON, "--max_iters=12", "--eval.eval_interval=6"))
    losses = [r["val_loss"] for r in evals(tmp_path / "clf")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


@pytest.mark.slow
def test_muon_in_two_processes_equals_one(data_dir, tmp_path):
    steps = [MUON, "--max_iters=6", "--batch.tokens_per_step=256", "--optim.grad_clip=0.5"]
    one = run_cli("train.py", *args(data_dir, tmp_path / "one", *steps))
    assert one.returncode == 0, one.stderr
    two = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                  *args(data_dir, tmp_path / "two", *steps), env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, f"exit {two.returncode}\n{two.stdout[-2000:]}\n{two.stderr[-6000:]}"
    # Newton-Schulz iterates in bfloat16 (torch.optim.Muon): gradients that differ by float32
    # rounding (the all-reduce adds in another order) now and then round an element to the
    # neighbouring bf16 value, and one such element moves the whole orthogonalised update by
    # up to 1% (measured). So one and two processes agree to about 2% in the block matrices
    # after six steps, not to float32's precision as AdamW runs do. Stepping on half of the
    # batch (what a process without the all-reduce would do) ends 27-49% apart (measured)
    l1, l2 = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert l1.keys() == l2.keys() == set(range(1, 7))
    for it in l1:
        assert l1[it] == pytest.approx(l2[it], abs=2e-4)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in w1:
        assert (w1[name] - w2[name]).norm() < 0.05 * w1[name].norm(), name
