"""Machine-dependent choices made by measurement: activation_checkpointing=auto, mixed_precision=auto,
compile=auto and train.time_budget."""

import contextlib
import json
import time

import numpy as np
import pytest
import torch

from pipeline.config.train import TrainSpec, parse_duration
from pipeline.errors import PipelineError
from pipeline.train import autotune, checkpoints, choices
from pipeline.train.autotune import TimeBudget, measure_compile, measure_precision
from pipeline.train.loss import CompiledOrEager, token_losses
from pipeline.train.strategy import to_device
from tests.trainer_helpers import autograd_saved_bytes, losses, make_trainer, tiny_model


def test_durations_parse_and_bad_ones_name_the_key():
    assert [parse_duration(t, "k") for t in ("90s", "6min", "1.5h", "1h30min")] == [90, 360, 5400, 5400]
    for bad in ("6", "six minutes", "0s", "6 minutes"):
        with pytest.raises(PipelineError, match="train.time_budget="):
            TrainSpec(time_budget=bad)
    with pytest.raises(PipelineError, match="train.warmup_steps to 3 or more"):  # the decay could not span the steps
        TrainSpec(time_budget="1min", warmup_steps=1)
    TrainSpec(time_budget="1min", warmup_steps=0, decay="constant")


def test_precision_measurement_leaves_weights_gradients_and_rng_as_they_were(monkeypatch):
    monkeypatch.setattr(autotune, "bf16_speedup", lambda shapes, device: 1.0)  # a tie: both timed at full size
    model = tiny_model()
    model.train()
    ids = torch.randint(0, 64, (4, 33))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = measure_precision(model, batch, torch.device("cpu"), run_passes=10**6, run_seconds=None)
    # bf16 is timed unless its passes run ABANDON times slower than fp32's (a tiny model's may)
    assert result["measured"] and result["choice"] in ("no", "bf16") and "no" in result["seconds"]
    assert result["choice"] == min(result["seconds"], key=result["seconds"].get)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), rng)
    short = measure_precision(model, batch, torch.device("cpu"), run_passes=20, run_seconds=None)
    assert short["choice"] == "no" and not short["measured"] and "too short" in short["reason"]
    assert short["pass_seconds"] > 0  # the pass it timed: compile=auto decides from it without another


def test_a_candidate_much_slower_at_full_size_is_abandoned_and_the_measurement_keeps_its_share(monkeypatch):
    monkeypatch.setattr(autotune, "bf16_speedup", lambda shapes, device: 1.0)
    calls = []

    def fake_pass(model, batch, device, precision, chunk_tokens):
        calls.append(precision)
        return {"no": 1.0, "bf16": 1.4 if len(calls) < 4 else 9.0}[precision]  # bf16 slows down mid-way

    monkeypatch.setattr(autotune, "_timed_pass", fake_pass)
    result = measure_precision(tiny_model(), {}, torch.device("cpu"), run_passes=None, run_seconds=10**6)
    assert result["choice"] == "no" and set(result["seconds"]) == {"no"}  # bf16's 9 s pass ended it
    assert calls.count("bf16") == 2  # the warm-up and the pass that was 9x the best: no more
    short = measure_precision(tiny_model(), {}, torch.device("cpu"), run_passes=None, run_seconds=100.0)
    assert short["measured"] is False  # 7 more 1 s passes would pass 5% of 100 s


def test_a_precision_whose_matmuls_screen_much_slower_is_never_run_at_full_size(monkeypatch):
    """An AVX2-only CPU emulates bf16 ~20x slower: its screen (milliseconds) ends the measurement."""
    monkeypatch.setattr(autotune, "bf16_speedup", lambda shapes, device: 0.05)
    passes = []
    monkeypatch.setattr(autotune, "token_losses", lambda *a, **k: passes.append(1))
    ids = torch.randint(0, 64, (4, 33))
    result = measure_precision(tiny_model(), {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, torch.device("cpu"),
                               run_passes=None, run_seconds=240.0)  # fmt: skip
    assert result["choice"] == "no" and result["not_run_at_full_size"] == ["bf16"] and not passes
    assert result["measured"] and result["cost_seconds"] < 1


@pytest.mark.parametrize("save_seconds", [0.0, 4.0])
def test_time_budget_fits_steps_evaluations_checkpoints_and_time_already_spent(save_seconds):
    budget = TimeBudget(100.0, started=0.0, warmup_steps=20, eval_every=10, ckpt_every=20)
    budget.eval_seconds = 2.0
    now = 10.0
    assert budget.steps(1, now, cap=10**6) is None  # step 0 (warm-up) is not timed
    for step in range(2, 11):
        if step == 5 and save_seconds:  # a checkpoint among the timed steps: its time is not a step's
            budget.saved(save_seconds)
            now += save_seconds
        assert budget.steps(step, now + (step - 1) * 0.5, cap=10**6) is None
    # 10 timed steps of 0.5 s; 100 - 15 s (+ 4 s) spent - 2 s final eval = 83 s (79 s) at 0.5 + 2/10 (+ 4/20) s/step
    left = 83 - save_seconds
    assert budget.steps(11, now + 5.0, cap=10**6) == 11 + int(left // (0.7 + save_seconds / 20))
    assert TimeBudget(100.0, 0.0, 20, 0).decide_after == 10 and TimeBudget(100.0, 0.0, 5, 0).decide_after == 4
    # resumed at step 5 of an 8-step warmup: steps 5..7 are the last whose learning rate is known
    assert TimeBudget(100.0, 0.0, 8, 0, start_step=5).decide_after == 2
    assert TimeBudget(100.0, 0.0, 0, 0, constant_lr=True).decide_after == 10


def test_a_time_budget_decides_the_steps_once_and_a_resume_keeps_them(tmp_path):
    trainer = make_trainer(
        tmp_path, max_steps=10**6, time_budget="8s", warmup_steps=6, ckpt_every=0, eval_every=0, log_every=5
    )
    summary = trainer.fit()
    decided = summary["launch"]["time_budget"]["steps"]
    assert (
        summary["steps"] == decided and 6 < decided < 10**6 and summary["launch"]["time_budget"]["decided_at_step"] == 6
    )
    assert len(losses(trainer)) == -(-decided // 5)  # every 5 steps and the last
    stored = checkpoints.peek(trainer.ckpt_root, "test")
    assert stored["max_steps"] == decided and stored["precision"] == "no"

    again = make_trainer(
        tmp_path, max_steps=10**6, time_budget="8s", warmup_steps=6, ckpt_every=0, eval_every=0, log_every=5
    )
    assert again.spec.max_steps == decided and again.choices.budget is None  # not measured again


def test_auto_precision_is_measured_used_and_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "bf16_speedup", lambda shapes, device: 1.0)  # the screen passes bf16 on
    trainer = make_trainer(tmp_path, mixed_precision="auto", max_steps=200, ckpt_every=0, eval_every=0)
    choice = trainer.choices.precision
    assert choice["measured"] and trainer.strategy.precision == choice["choice"]
    short = make_trainer(tmp_path / "short", mixed_precision="auto", max_steps=8)
    assert not short.choices.precision["measured"] and short.strategy.precision == "no"
    short.fit()
    assert checkpoints.peek(short.ckpt_root, "test")["precision"] == "no"
    pinned = make_trainer(tmp_path / "short", mixed_precision="auto", max_steps=8)
    assert pinned.choices.precision == {
        "choice": "no",
        "measured": False,
        "reason": "as chosen at the start of this run",
    }


def test_a_stored_precision_is_kept_only_on_the_same_kind_of_device(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "bf16_speedup", lambda shapes, device: 1.0)  # the screen passes bf16 on
    make_trainer(tmp_path, mixed_precision="auto", max_steps=8).fit()
    state_file = sorted((tmp_path / "checkpoints").glob("step_*"))[-1] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["precision_device"] == "cpu"
    state_file.write_text(json.dumps(dict(state, precision="bf16", precision_device="cuda")))
    again = make_trainer(tmp_path, mixed_precision="auto", max_steps=8)
    assert again.choices.precision.get("reason", "").startswith("run too short")  # decided afresh, not bf16


def _losses_taking(seconds: float, model):
    """A stand-in for the training loss whose forward takes `seconds`."""

    def run():
        time.sleep(seconds)
        return model(torch.ones(2, 4)).squeeze(-1)

    return run


def test_compile_is_chosen_when_it_measures_faster_and_leaves_no_gradients():
    model = torch.nn.Linear(4, 1)
    faster = measure_compile(
        _losses_taking(0.03, model),
        _losses_taking(0.005, model),
        model,
        torch.device("cpu"),
        run_passes=10**6,
        run_seconds=None,
    )
    assert faster["choice"] and faster["measured"] and faster["seconds"]["compiled"] < faster["seconds"]["eager"]
    assert all(p.grad is None for p in model.parameters())
    slower = measure_compile(
        _losses_taking(0.005, model),
        _losses_taking(0.03, model),
        model,
        torch.device("cpu"),
        run_passes=10**6,
        run_seconds=None,
    )
    assert slower["measured"] and not slower["choice"]


def test_compile_is_not_tried_in_a_run_too_short_to_repay_it():
    model = torch.nn.Linear(4, 1)

    def never():
        raise AssertionError("compiled in a run too short to repay it")

    short = measure_compile(
        _losses_taking(0.0, model), never, model, torch.device("cpu"), run_passes=10**6, run_seconds=240.0, n_layer=4
    )  # the quickstart's 4 minutes: 5% is 12 s, a cold compile of its 4 blocks ~40 s
    assert short["choice"] is False and "too short" in short["reason"]


def test_an_eager_pass_already_timed_rules_compiling_out_without_another():
    model = torch.nn.Linear(4, 1)

    def never():
        raise AssertionError("a pass ran although the timed one showed the run too short")

    short = measure_compile(
        never, never, model, torch.device("cpu"), run_passes=8, run_seconds=None, n_layer=30, pass_seconds=30.0
    )  # 8 passes of 30 s (SmolLM2-135M at 8 x 512 on 2 cores): 5% is 12 s, a compile ~300 s
    assert short["choice"] is False and not short["measured"] and "too short" in short["reason"]


def test_saved_activations_are_counted_and_scale_with_the_rows_and_the_rng_is_left_alone():
    model = tiny_model()
    ids = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    one = {"input_ids": ids[:1, :-1], "labels": ids[:1, 1:]}
    four = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    rng = torch.get_rng_state()
    counted = autotune.saved_activation_bytes(model, one, 0, 32)
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())
    assert counted == autograd_saved_bytes(model, lambda: token_losses(model, one, 0))  # the test's own count
    assert autotune.saved_activation_bytes(model, four, 0, 128) == pytest.approx(4 * counted, rel=0.05)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert autotune.saved_activation_bytes(model, one, 0, 32) < counted / 2  # layer inputs only


@pytest.mark.parametrize("free_gb, on", [(0.001, True), (1000.0, False)])
def test_auto_activation_checkpointing_follows_the_memory_free(tmp_path, monkeypatch, free_gb, on):
    monkeypatch.setattr(choices, "free_memory", lambda device: int(free_gb * 1e9))
    trainer = make_trainer(tmp_path, activation_checkpointing="auto", key="finetune.train")
    assert trainer.spec._key == "finetune.train"  # the decided spec's errors still name the stage's keys
    facts = trainer.choices.checkpointing
    assert facts["measured"] and facts["choice"] is on and facts["activations_gb"] > 0
    assert trainer.model.is_gradient_checkpointing is on
    assert trainer.spec.activation_checkpointing is on  # the pre-flight estimate and the manifest see the choice
    trainer.fit()
    explicit = make_trainer(tmp_path / "explicit", activation_checkpointing=False)
    assert explicit.choices.checkpointing == {"choice": False, "measured": False}


def test_auto_activation_checkpointing_recomputes_only_the_blocks_memory_needs(tmp_path, monkeypatch):
    roomy = make_trainer(tmp_path / "roomy", activation_checkpointing="auto")
    roomy.fit()
    device = roomy.strategy.device
    row = to_device(roomy.job.train_batch(0, 1), device)
    measured = autotune.saved_activation_bytes(roomy.model, row, 0, 32) * roomy.spec.micro_batch_size  # as auto does
    trainable = sum(p.numel() for p in roomy.model.parameters())
    room = 0.9 * measured  # one of the two blocks recomputed frees more than a tenth
    share = autotune.ACTIVATION_SHARE[device.type]
    monkeypatch.setattr(choices, "free_memory", lambda device: int(room / share) + 12 * trainable)
    tight = make_trainer(tmp_path / "tight", activation_checkpointing="auto")
    facts = tight.choices.checkpointing
    assert facts["choice"] and (facts["recomputed_blocks"], facts["blocks"]) == (1, 2)
    assert [b.gradient_checkpointing for b in autotune.checkpointed_blocks(tight.model)] == [True, False]
    kept = autotune.saved_activation_bytes(tight.model, row, 0, 32) * tight.spec.micro_batch_size
    assert kept <= room < measured  # what the choice keeps fits where everything would not
    tight.fit()
    np.testing.assert_allclose(losses(tight), losses(roomy), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_freed_buffers_are_kept_only_where_activations_are_not_recomputed(tmp_path, monkeypatch, checkpointing):
    entered = []

    @contextlib.contextmanager
    def kept():
        entered.append("in")
        yield
        entered.append("out")

    monkeypatch.setattr(choices, "freed_memory_kept", kept)
    with contextlib.ExitStack() as allocator:
        make_trainer(tmp_path, allocator=allocator, activation_checkpointing=checkpointing)
        assert entered == ([] if checkpointing else ["in"])
    assert entered == ([] if checkpointing else ["in", "out"])


def test_auto_compile_is_measured_once_and_a_resume_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setitem(autotune.COMPILE_SECONDS_PER_LAYER, "cpu", 0.0)  # any run is long enough to try
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: fn)  # the test is the decision, not inductor
    calls = []

    def measured(eager, compiled, *args, **kwargs):
        calls.append(1)
        compiled()  # what training will call, through the strategy
        return {"choice": True, "measured": True, "seconds": {"eager": 2.0, "compiled": 1.0}, "compile_seconds": 9.0}

    monkeypatch.setattr(choices, "measure_compile", measured)
    trainer = make_trainer(tmp_path, max_steps=8)
    assert trainer.choices.compile["choice"] and isinstance(trainer.loss, CompiledOrEager)
    summary = trainer.fit()
    assert summary["launch"]["compiled"] and summary["launch"]["compile_choice"]["seconds"]["compiled"] == 1.0
    assert checkpoints.peek(trainer.ckpt_root, "test")["compile"] is True
    again = make_trainer(tmp_path, max_steps=12)
    assert len(calls) == 1 and again.choices.compile["reason"] == "as chosen at the start of this run"
    assert isinstance(again.loss, CompiledOrEager)
    off = make_trainer(tmp_path / "off", max_steps=8, compile=False)
    assert off.loss is token_losses and len(calls) == 1  # an explicit value is obeyed


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [0, 7])
def test_the_compiled_loss_trains_like_eager(tmp_path, chunk):
    """Real inductor: the model and its loss (plain, or chunked as on GPUs) compiled as one graph
    give eager's plain losses."""
    compiled = make_trainer(tmp_path / "c", compile=True, loss_chunk_tokens=chunk, max_steps=4, eval_every=0)
    summary = compiled.fit()
    assert summary["launch"]["compiled"] is True
    eager = make_trainer(tmp_path / "e", compile=False, loss_chunk_tokens=0, max_steps=4, eval_every=0)
    eager.fit()
    np.testing.assert_allclose(losses(compiled), losses(eager), rtol=1e-4)


def test_the_real_measurement_times_the_compiled_loss_in_training_mode(tmp_path, monkeypatch):
    monkeypatch.setitem(autotune.COMPILE_SECONDS_PER_LAYER, "cpu", 0.0)
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: fn)  # eager twice: the decision is a near-tie
    modes = []
    real = choices.token_losses

    def spy(model, batch, chunk=0):
        modes.append(model.training)
        return real(model, batch, chunk)

    monkeypatch.setattr(choices, "token_losses", spy)
    trainer = make_trainer(tmp_path, max_steps=10_000)  # long enough that the other measurements leave room
    trainer.model.eval()  # as a from_pretrained base comes
    choice, _ = choices.choose_compile(trainer.job, trainer.spec, trainer.strategy, trainer.model, None)
    # Each measurement: 2 eager warm-up/first passes, the compile, 3 x (compiled + eager); once in
    # building the launch, once here; every one in training mode.
    assert choice["measured"] and set(modes) == {True} and len(modes) == 2 * (2 + 1 + 3 * 2)
    assert not trainer.model.training  # left as it was
