"""The parallel forward, the chunked prompt path and the recurrent step must agree token for token."""

import pytest
import torch

from apertis_core import ApertisModel

from conftest import tiny_config

FAMILIES = ["apertis-nano", "apertis-hybrid-nano", "transformer-nano"]


def stepwise_logits(model, ids, state=None):
    state = state if state is not None else model.init_state(ids.shape[0])
    outputs = []
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        outputs.append(logits)
    return torch.stack(outputs, 1), state


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("length", [1, 8, 13, 29])
def test_step_matches_parallel_forward(preset, length):
    model = ApertisModel(tiny_config(preset)).eval()
    ids = torch.randint(0, 97, (2, length))
    with torch.no_grad():
        parallel = model(ids).logits
        stepped, _ = stepwise_logits(model, ids)
    assert (parallel - stepped).abs().max() <= 1e-4


@pytest.mark.parametrize("preset", FAMILIES)
def test_prompt_then_step_matches_parallel_forward(preset):
    model = ApertisModel(tiny_config(preset)).eval()
    ids = torch.randint(0, 97, (2, 27))
    with torch.no_grad():
        parallel = model(ids).logits
        prompt = model(ids[:, :19], state=model.init_state(2))
        continued, _ = stepwise_logits(model, ids[:, 19:], prompt.state)
    combined = torch.cat([prompt.logits, continued], dim=1)
    assert (parallel - combined).abs().max() <= 1e-4


def test_sliding_window_attention_step_matches_parallel():
    model = ApertisModel(tiny_config("transformer-nano", sliding_window=5, qk_norm=True, nope_layers=[1])).eval()
    ids = torch.randint(0, 97, (1, 23))
    with torch.no_grad():
        parallel = model(ids).logits
        prompt = model(ids[:, :9], state=model.init_state(1))
        continued, state = stepwise_logits(model, ids[:, 9:], prompt.state)
    assert (parallel - torch.cat([prompt.logits, continued], 1)).abs().max() <= 1e-4
    assert state[0]["mixer"]["k"].shape[2] == 5  # the cache never holds more than the window


def test_sliding_window_limits_what_a_token_sees():
    model = ApertisModel(tiny_config("transformer-nano", sliding_window=4, n_layers=1)).eval()
    ids = torch.randint(0, 97, (1, 12))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 97
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert (a[0, 4:] - b[0, 4:]).abs().max() == 0  # position 0 is outside every window from 4 on
    assert (a[0, 3] - b[0, 3]).abs().max() > 0


@pytest.mark.parametrize("preset", FAMILIES)
def test_changing_a_token_never_changes_earlier_logits(preset):
    model = ApertisModel(tiny_config(preset)).eval()
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[0, 11] = (ids[0, 11] + 5) % 97
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    # Expert dispatch regroups tokens, so BLAS may round earlier rows differently in the last bits;
    # a causality leak would move them by orders of magnitude more.
    assert (a[0, :11] - b[0, :11]).abs().max() < 1e-6
    assert (a[0, 11:] - b[0, 11:]).abs().max() > 1e-3


def state_bytes(state):
    total = 0
    for layer in state:
        for part in layer.values():
            total += sum(t.numel() * t.element_size() for t in part.values() if torch.is_tensor(t))
    return total


def test_linear_state_size_does_not_grow_with_tokens():
    model = ApertisModel(tiny_config("apertis-nano")).eval()
    with torch.no_grad():
        short = model(torch.randint(0, 97, (1, 5)), state=model.init_state(1)).state
        long = model(torch.randint(0, 97, (1, 200)), state=model.init_state(1)).state
        _, stepped = stepwise_logits(model, torch.randint(0, 97, (1, 30)), long)
    assert state_bytes(short) == state_bytes(long) == state_bytes(stepped) == state_bytes(model.init_state(1))


def test_kv_cache_grows_with_tokens_for_attention():
    model = ApertisModel(tiny_config("transformer-nano")).eval()
    with torch.no_grad():
        short = model(torch.randint(0, 97, (1, 5)), state=model.init_state(1)).state
        long = model(torch.randint(0, 97, (1, 50)), state=model.init_state(1)).state
    assert state_bytes(long) == 10 * state_bytes(short)


def test_chunk_size_does_not_change_outputs():
    ids = torch.randint(0, 97, (2, 40))
    torch.manual_seed(1)
    small = ApertisModel(tiny_config("apertis-nano", sla_chunk_size=4)).eval()
    torch.manual_seed(1)
    large = ApertisModel(tiny_config("apertis-nano", sla_chunk_size=16)).eval()
    with torch.no_grad():
        assert (small(ids).logits - large(ids).logits).abs().max() <= 1e-4


def test_long_sequences_stay_finite_under_strong_decay():
    model = ApertisModel(tiny_config("apertis-nano", n_experts=0, strc_every=1)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.A_log.fill_(6.0)  # decays of exp(-400): the naive form would overflow
        out = model(torch.randint(0, 97, (1, 300))).logits
    assert torch.isfinite(out).all()


def test_decode_updates_state_in_place_only_without_autograd():
    model = ApertisModel(tiny_config("apertis-nano")).eval()
    ids = torch.randint(0, 97, (1, 6))
    with torch.inference_mode():
        state = model(ids, state=model.init_state(1)).state
        before = state[0]["mixer"]["S"]
        _, stepped = model.step(ids[:, -1], state)
    assert stepped[0]["mixer"]["S"] is before  # generation: no new state tensors per token
    state = model(ids, state=model.init_state(1)).state
    kept = state[0]["mixer"]["S"].clone()
    model.step(ids[:, -1], state)  # with autograd on, the caller's state is left as it was
    assert torch.equal(state[0]["mixer"]["S"], kept)
    with torch.inference_mode():
        frozen = model(ids, state=model.init_state(1)).state
    with torch.no_grad():
        model.step(ids[:, -1], frozen)  # an inference-mode state outside inference mode: copied, no error
