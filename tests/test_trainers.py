"""transformers.Trainer, accelerate and Lightning driving kaon optimizers, for real.

The ``test`` extra installs the three packages; nothing is downloaded (the language model is
built from a config with random weights).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_conformance import assert_same, loss_of, make_model, params_of

import kaon
from kaon.integrations import accelerate as kaon_accelerate
from kaon.integrations import huggingface

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


class TokenData(torch.utils.data.Dataset):
    """Sequences of a fixed repeating pattern: easy to learn, no download."""

    def __init__(self, n: int = 32) -> None:
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = torch.tensor([(i + 3 * t) % 64 for t in range(16)])
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(16)}


def training_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                  learning_rate=3e-3, weight_decay=0.01, logging_steps=1, report_to=[],
                  use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                  lr_scheduler_type="constant", dataloader_num_workers=0)
    values.update(overrides)
    return transformers.TrainingArguments(**values)


def run_trainer(args, pair, eval_dataset=None):
    model = tiny_llama()
    start = params_of(model)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(),
                                   eval_dataset=eval_dataset, optimizer_cls_and_kwargs=pair)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return trainer, model, start, losses


def test_transformers_trainer_with_class_and_optim_args_string(tmp_path):
    args = training_args(tmp_path, optim_args="momentum_dtype=int8, betas=(0.9,0.99),cautious=False")
    pair = huggingface.optimizer_cls_and_kwargs("Adakaon", args=args)
    assert pair == (kaon.Adakaon, {"lr": 3e-3, "momentum_dtype": "int8", "betas": (0.9, 0.99),
                                   "cautious": False})
    trainer, model, start, losses = run_trainer(args, pair)
    opt = kaon_accelerate.unwrap(trainer.optimizer)
    assert type(opt) is kaon.Adakaon
    # the Trainer's two groups: decayed weights and no-decay biases / norms
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["cautious"] is False
    assert opt.state[model.lm_head.weight]["m"].dtype == torch.int8
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2])
    assert all(not torch.equal(a, b) for a, b in zip(start, params_of(model)))


def test_transformers_trainer_with_model_aware_factory(tmp_path):
    args = training_args(tmp_path, optim_args="momentum_dtype=bfloat16")
    pair = huggingface.optimizer_cls_and_kwargs(
        "Muon", args=args, model_aware=True, overrides={"model.embed_tokens.*": {"lr": 1e-3}})
    factory, kwargs = pair
    assert isinstance(factory, huggingface.ModelAwareFactory)
    assert kwargs == {"lr": 3e-3, "weight_decay": 0.01, "momentum_dtype": "bfloat16"}
    trainer, model, start, losses = run_trainer(args, pair)
    opt = kaon_accelerate.unwrap(trainer.optimizer)
    assert type(opt) is kaon.Muon
    expected = kaon.build_optimizer(tiny_llama(), "Muon", weight_decay=0.01, lr=3e-3,
                                    momentum_dtype="bfloat16",
                                    overrides={"model.embed_tokens.*": {"lr": 1e-3}})
    def groups(o):  # the scheduler adds initial_lr / base_lr to the Trainer's groups
        return [(g["param_names"], g["weight_decay"], g["muon"], g.get("initial_lr", g["lr"]))
                for g in o.param_groups]

    assert groups(opt) == groups(expected)
    routed = {n: g["muon"] for g in opt.param_groups for n in g["param_names"]}
    assert routed["model.layers.0.self_attn.q_proj.weight"] is True
    assert routed["model.embed_tokens.weight"] is False and routed["lm_head.weight"] is False
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])


class ModeLog(kaon.ScheduleFreeAdamW):
    """ScheduleFreeAdamW recording the train / eval switches that reach it."""

    log: list = []

    def train(self, mode=True):
        ModeLog.log.append(mode)
        return super().train(mode)


def test_transformers_trainer_switches_schedule_free_around_evaluation(tmp_path):
    ModeLog.log = []
    args = training_args(tmp_path, eval_strategy="steps", eval_steps=3,
                         per_device_eval_batch_size=8)
    trainer, model, _, losses = run_trainer(args, (ModeLog, {"lr": 3e-3}), TokenData(8))
    # step() raises in eval mode: six steps after evaluations mean train() came back each time
    assert len(losses) == 6
    assert False in ModeLog.log and ModeLog.log[-1] is False  # the final evaluation
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    assert len(evals) == 2


def test_huggingface_argument_errors():
    with pytest.raises(ValueError, match="unknown optimizer"):
        huggingface.optimizer_cls_and_kwargs("NoSuchOptimizer")
    with pytest.raises(ValueError, match="name=value"):
        huggingface.optimizer_cls_and_kwargs("Adakaon", "momentum_dtype")
    with pytest.raises(TypeError, match="model_aware"):
        huggingface.optimizer_cls_and_kwargs("Adakaon", overrides={"x": {"lr": 1.0}})
    with pytest.raises(TypeError, match="optimizer must be"):
        huggingface.optimizer_cls_and_kwargs(42)
    cls, kwargs = huggingface.optimizer_cls_and_kwargs("Lion:betas=0.9|0.99", {"lr": 1e-4},
                                                       weight_decay=0.1)
    assert cls is kaon.Lion and kwargs == {"betas": (0.9, 0.99), "lr": 1e-4, "weight_decay": 0.1}


# ------------------------------------------------------------------------ accelerate, Lightning
accelerate = pytest.importorskip("accelerate")


@pytest.mark.parametrize("cls", [kaon.ScheduleFreeAdamW, kaon.Nekaon], ids=lambda c: c.__name__)
def test_accelerated_optimizer_passes_train_and_eval_through(cls):
    model = make_model()
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, cls(model.parameters(), lr=1e-2))
    assert isinstance(opt, accelerate.optimizer.AcceleratedOptimizer)
    inner = kaon_accelerate.unwrap(opt)
    assert type(inner) is cls
    for i in range(3):
        accelerator.backward(loss_of(model, i))
        opt.step()
        opt.zero_grad()
    live = params_of(model)
    opt.eval()
    assert not inner.training
    assert any(not torch.equal(a, b) for a, b in zip(live, params_of(model)))
    with pytest.raises(RuntimeError, match="eval mode"):
        accelerator.backward(loss_of(model, 3))
        opt.step()
    opt.zero_grad()
    opt.train()
    assert inner.training
    assert_same(live, params_of(model))
    kaon_accelerate.eval_mode(opt)
    assert not inner.training
    kaon_accelerate.train_mode(opt)
    assert_same(live, params_of(model))


def test_unwrap():
    opt = kaon.Adakaon(make_model().parameters())
    assert kaon_accelerate.unwrap(opt) is opt

    class Outer:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert kaon_accelerate.unwrap(Outer(Outer(opt))) is opt
    with pytest.raises(TypeError, match="no torch.optim.Optimizer"):
        kaon_accelerate.unwrap(Outer(None))


lightning = pytest.importorskip("lightning")


@pytest.mark.parametrize("cls", [kaon.ScheduleFreeAdamW, kaon.Nekaon], ids=lambda c: c.__name__)
def test_lightning_optimizer_wrapper_switches_our_mode(cls):
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = make_model()
    opt = cls(model.parameters(), lr=1e-2)
    for i in range(2):
        loss_of(model, i).backward()
        opt.step()
        opt.zero_grad()
    live = params_of(model)
    wrapped = LightningOptimizer(opt)
    wrapped.eval()
    assert not opt.training  # the optimizer itself, not only the wrapper
    with pytest.raises(RuntimeError, match="eval mode"):
        loss_of(model, 2).backward()
        opt.step()
    opt.zero_grad()
    wrapped.train()
    assert opt.training
    assert_same(live, params_of(model))


class LitNet(lightning.LightningModule):
    def __init__(self, cls):
        super().__init__()
        self.net = make_model()
        self.cls = cls
        self.modes: list = []

    def training_step(self, batch, i):
        self.modes.append(("train", self.trainer.optimizers[0].training))
        return (self.net(batch[0]) - batch[1]).pow(2).mean()

    def validation_step(self, batch, i):
        self.modes.append(("val", self.trainer.optimizers[0].training))
        return (self.net(batch[0]) - batch[1]).pow(2).mean()

    def configure_optimizers(self):
        return self.cls(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("cls", [kaon.ScheduleFreeAdamW, kaon.Nekaon], ids=lambda c: c.__name__)
def test_lightning_callback_brackets_validation(cls):
    from kaon.integrations.lightning import train_eval_callback

    x = torch.randn(16, 3, 8, 8)
    data = torch.utils.data.TensorDataset(x, x.flatten(1)[:, :4])
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    module = LitNet(cls)
    trainer = lightning.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[train_eval_callback()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader, loader)
    assert ("train", True) in module.modes and ("val", False) in module.modes
    assert ("train", False) not in module.modes and ("val", True) not in module.modes
    assert not trainer.optimizers[0].training  # fit ends in eval mode: weights to save


# ------------------------------- issue 17, case 16: gradient release under Trainer accumulation
def test_gradient_release_under_trainer_accumulation_equals_the_normal_loop(tmp_path):
    """The Trainer never sets optimizer_accumulation; the release reads accelerate's
    sync_gradients (which the Trainer sets per micro-batch) and accumulates instead of stepping
    on every micro-batch."""

    class Release(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            kaon.prepare_for_gradient_release(model, kaon_accelerate.unwrap(optimizer))

    def run(release):
        args = training_args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                             max_steps=3, max_grad_norm=0.0)
        model = tiny_llama()
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=TokenData(),
            optimizer_cls_and_kwargs=(kaon.Adakaon, {"lr": 3e-3, "bf16_method": "none"}),
            callbacks=[Release()] if release else [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        kaon.remove_gradient_release(model)
        return params_of(model)

    torch.testing.assert_close(run(True), run(False), rtol=1e-6, atol=1e-7)


def test_gradient_release_refuses_a_second_backward_pass_before_step():
    """A plain loop that accumulates without optimizer_accumulation: refused, not stepped."""
    model = make_model()
    opt = kaon.Adakaon(model.parameters(), lr=1e-2)
    kaon.prepare_for_gradient_release(model, opt)
    try:
        loss_of(model, 0).backward()
        opt.step()  # the loop is seen calling step()
        loss_of(model, 1).backward()
        before = params_of(model)
        with pytest.raises(RuntimeError, match="optimizer_accumulation"):
            loss_of(model, 2).backward()  # a second micro-batch, no step() in between
        assert_same(before, params_of(model))  # the first hook refused: nothing stepped
        opt.step()
        loss_of(model, 3).backward()  # after step() the loop goes on
    finally:
        kaon.remove_gradient_release(model)
