"""Looped depth (model/looped.py): off equals the plain model, weights shared across passes, parallel form ==
step with tokens stopping at different passes, the confidence head learns from the loss, a looped run trains
and round-trips through a bundle, and the studio's extra settings accept the fields."""

import math

import pytest
import torch

from apertis_core import ConfigError
from apertis_core.bundle import load_bundle
from apertis_core.model import ApertisModel
from apertis_core.training import RunConfig, read_metrics, train

from conftest import SHAKESPEARE, tiny_config

LOOPED = dict(max_loops=3, loop_blocks="1-2")


def _steps(model, ids, state):
    logits = []
    for t in range(ids.shape[1]):
        step_logits, state = model.step(ids[:, t], state)
        logits.append(step_logits)
    return torch.stack(logits, 1), state


def _mixed_halting(model):
    """Scale the confidence head up so tokens clearly disagree: some stop after pass 1, some take every pass."""
    with torch.no_grad():
        model.loop.head.weight.mul_(300.0)
    return model.eval()


def test_max_loops_1_is_the_plain_model():
    plain = ApertisModel(tiny_config("apertis-nano")).eval()
    torch.manual_seed(0)
    off = ApertisModel(tiny_config("apertis-nano", max_loops=1, loop_blocks="1-2")).eval()
    assert off.loop is None and off.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), plain.state_dict().values(), strict=True))
    ids = torch.randint(0, 97, (2, 12))
    assert torch.equal(off(ids).logits, plain(ids).logits)


def test_stopping_every_token_after_the_first_pass_is_the_plain_model():
    plain = ApertisModel(tiny_config("apertis-hybrid-nano")).eval()
    looped = ApertisModel(tiny_config("apertis-hybrid-nano", **LOOPED, loop_halt_threshold=1.0)).eval()
    missing = looped.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["loop.head.weight", "loop.head.bias"]
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert torch.allclose(looped(ids).logits, plain(ids).logits, atol=1e-6)
        stepped, _ = _steps(looped, ids, looped.init_state(1))
    assert torch.allclose(stepped, plain(ids).logits, atol=1e-5)
    assert looped.loop.last_passes.eq(1).all()


def test_parameters_are_shared_across_passes_apart_from_the_head():
    counts = {k: ApertisModel(tiny_config("apertis-nano", max_loops=k)).num_parameters() for k in (1, 2, 4)}
    d_model = 32
    assert counts[2] - counts[1] == d_model + 1  # one logit (weights + bias) per decision
    assert counts[4] - counts[1] == 3 * (d_model + 1)
    flops = {k: ApertisModel(tiny_config("apertis-nano", max_loops=k)).flops_per_token(64) for k in (1, 2)}
    assert 1.9 < flops[2] / flops[1] < 2.1  # every block is in the group: each pass costs a whole stack


@pytest.mark.parametrize("preset, group", [("apertis-nano", "1-2"), ("apertis-hybrid-nano", "1-3")])
def test_parallel_form_matches_step_when_tokens_stop_at_different_passes(preset, group):
    model = _mixed_halting(ApertisModel(tiny_config(preset, max_loops=3, loop_blocks=group)))
    ids = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        whole = model(ids, state=model.init_state(1))
        passes = model.loop.last_passes
        assert set(passes.flatten().tolist()) == {1, 2, 3}  # the halting really is mixed
        first = model(ids[:, :11], state=model.init_state(1))
        rest = model(ids[:, 11:], state=first.state)
        stepped, state = _steps(model, ids, model.init_state(1))
        stateless = model(ids).logits
    assert torch.allclose(stepped, whole.logits, atol=1e-4)
    assert torch.allclose(torch.cat([first.logits, rest.logits], 1), whole.logits, atol=1e-4)
    assert torch.allclose(stateless, whole.logits, atol=1e-5)
    assert len(state) == len(whole.state) == 4 + 2 * len(model.config.loop_group())  # a state per pass
    for step_entry, whole_entry in zip(state, whole.state, strict=True):
        s, w = step_entry["mixer"], whole_entry["mixer"]
        if "S" in s:
            assert torch.allclose(s["S"], w["S"], atol=1e-4) and torch.allclose(s["conv"], w["conv"], atol=1e-5)
        else:  # a stopped token leaves no key in the later passes' caches
            assert s["pos"] == w["pos"] and torch.allclose(s["k"], w["k"], atol=1e-5)
    attention_positions = [entry["mixer"]["pos"] for entry in state if "pos" in entry["mixer"]]
    if attention_positions:
        assert attention_positions == [24, int((passes >= 2).sum()), int((passes >= 3).sum())]


def test_rows_of_a_batch_stop_independently():
    model = _mixed_halting(ApertisModel(tiny_config("apertis-nano", **LOOPED)))
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        batch = model(ids, state=model.init_state(2))
        assert not torch.equal(model.loop.last_passes[0], model.loop.last_passes[1])
        stepped, _ = _steps(model, ids, model.init_state(2))
        alone = torch.cat([model(ids[b : b + 1], state=model.init_state(1)).logits for b in range(2)])
        padded_free = model(ids).logits
    assert torch.allclose(batch.logits, alone, atol=1e-4) and torch.allclose(stepped, alone, atol=1e-4)
    assert torch.allclose(padded_free, alone, atol=1e-4)


def test_a_shared_kv_cache_refuses_rows_that_stop_at_different_passes():
    model = _mixed_halting(ApertisModel(tiny_config("apertis-hybrid-nano", max_loops=3, loop_blocks="1-3")))
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad(), pytest.raises(ValueError, match="loop_halt_threshold=0"):
        model(ids, state=model.init_state(2))
    everyone = ApertisModel(tiny_config("apertis-hybrid-nano", max_loops=3, loop_halt_threshold=0.0)).eval()
    with torch.no_grad():
        out = everyone(ids, state=everyone.init_state(2))
        stepped, _ = _steps(everyone, ids, everyone.init_state(2))
    assert everyone.loop.last_passes.eq(3).all() and torch.allclose(stepped, out.logits, atol=1e-4)


def test_confidence_head_learns_whether_a_later_pass_lowered_the_loss():
    model = ApertisModel(tiny_config("apertis-nano", **LOOPED)).train()
    ids = torch.randint(0, 97, (2, 12))
    model(ids, labels=ids).aux_loss.backward()
    assert model.loop.head.weight.grad.abs().sum() > 0 and model.loop.head.bias.grad.abs().sum() > 0
    model.zero_grad()
    model(ids).aux_loss.backward()  # without labels nothing trains the head
    assert model.loop.head.weight.grad is None or model.loop.head.weight.grad.abs().sum() == 0

    # The targets: token 0's later exit is far better (go on), token 1's is no better (stop); label -100 is skipped.
    loop = ApertisModel(tiny_config("apertis-nano", **LOOPED, loop_exit_coef=0.0, loop_confidence_coef=1.0)).loop
    labels = torch.tensor([[3, 3, -100]])
    good = torch.full((1, 3, 97), -10.0)
    good[..., 3] = 10.0
    bad = good.clone()
    bad[0, 0] = 0.0  # token 0 predicted uniformly at the early exit
    confidence = torch.zeros(1, 3, requires_grad=True)
    loss = loop._loop_loss([bad], [confidence], good, labels)
    loss.backward()
    assert math.isclose(float(loss.detach()), math.log(2), rel_tol=1e-5)  # every logit at 0: BCE log 2, either target
    assert confidence.grad[0, 0] < 0 < confidence.grad[0, 1] and confidence.grad[0, 2] == 0


def test_a_looped_run_trains_and_round_trips_through_a_bundle(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    model = dict(preset="apertis-nano", d_model=32, n_layers=3, n_heads=2, n_experts=0, strc_every=0, **LOOPED)
    model["loop_blocks"] = "1"
    run = RunConfig.from_dict(
        {
            "model": model,
            "data": {"path": str(data), "seq_len": 32, "vocab_size": 300},
            "train": dict(batch_size=4, max_steps=14, warmup_steps=3, eval_every=0, log_every=1, lr=3e-3, seed=7),
            "out_dir": str(tmp_path / "run"),
        }
    )
    run.train.precision, run.train.device = "fp32", "cpu"
    result = train(run)
    losses = [m["train/loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in m]
    assert len(losses) == 14 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.4
    loaded, tokenizer = load_bundle(result.bundle_dir)
    cfg = loaded.config
    assert (cfg.max_loops, cfg.loop_blocks, cfg.loop_halt_threshold) == (3, "1", 0.5) and loaded.loop is not None
    ids = torch.tensor([tokenizer.encode("ROMEO: What say you?")])
    with torch.no_grad():
        out = loaded(ids, state=loaded.init_state(1))
        stepped, _ = _steps(loaded, ids, loaded.init_state(1))
    assert torch.allclose(out.logits, stepped, atol=1e-4)


@pytest.mark.parametrize(
    "changes, says",
    [
        (dict(max_loops=0), "max_loops"),
        (dict(max_loops=2, loop_blocks="two"), "loop_blocks"),
        (dict(max_loops=2, loop_blocks="3-1"), "first <= last"),
        (dict(max_loops=2, loop_blocks="2-9"), "within blocks 0-3"),
        (dict(max_loops=2, loop_halt_threshold=1.5), "loop_halt_threshold"),
        (dict(max_loops=2, loop_confidence_coef=-1.0), "loop_confidence_coef"),
    ],
)
def test_bad_loop_settings_are_refused_with_their_name(changes, says):
    with pytest.raises(ConfigError, match=says):
        tiny_config("apertis-nano", **changes)


def test_studio_extra_settings_accept_the_loop_fields(tmp_path):
    from studio import run_config
    from studio.app import Services
    from studio.jobs import JobManager
    from studio.store import Store
    from studio.tabs import dataset, train

    store = Store(tmp_path / "ws")
    services = Services(store=store, jobs=JobManager(store))
    data_id = dataset.add_demo(services, "text")[1]
    form = dict(train.BASIC_DEFAULTS, **train.ADVANCED_DEFAULTS)
    extra = "model.max_loops=4\nmodel.loop_blocks=1-2\nmodel.loop_halt_threshold=0.3"
    mapping = run_config.run_mapping(services, data_id, "apertis-nano", dict(form, extra=extra))
    assert (mapping["model"]["max_loops"], mapping["model"]["loop_blocks"]) == (4, "1-2")
    assert mapping["model"]["loop_halt_threshold"] == 0.3
    with pytest.raises(ConfigError, match="loop_blocks"):
        run_config.run_mapping(
            services, data_id, "apertis-nano", dict(form, extra="model.max_loops=2\nmodel.loop_blocks=x")
        )


def test_benchmark_runs_at_toy_sizes(capsys, tmp_path):
    import json

    from benchmarks import looped as bench

    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--json", str(tmp_path / "looped.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "### 1. Equal steps" in printed and "### 2. Equal wall clock" in printed and "### 3. Passes" in printed
    results = json.loads((tmp_path / "looped.json").read_text())
    assert [row["loops"] for row in results["equal_time"]] == [1, 2, 4]
    assert min(row["steps"] for row in results["equal_time"]) == 3  # the slowest stops where part 1 ended
