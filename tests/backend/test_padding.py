"""Padding rows never touch real data: warm-up, tracing and capture write only the spare slot.

A real sequence is prefilled into its KV-cache slot first; then kiln traces, compiles, runs its
first batch and (on CUDA) captures, all on padding rows, and replays a padded batch. The real
slots stay byte-identical, without any reset_cache() that would hide a stray write, and the
sequence then decodes exactly as on an eager twin that never saw a warm-up.
"""

from __future__ import annotations

import pytest
import torch

from examples.toy_llama import build
from kiln.workers.config import CompilationConfig
from kiln.workers.layers.custom_op import building_with
from kiln.workers.runtime.kiln_model import KilnModel
from tests.orchestrator.conftest import TINY

SLOT, PROMPT = 1, 5  # the real sequence: slot 1, a prompt of 5 tokens
PAD = TINY["max_seqs"]  # the spare slot padding rows write to


def kv_caches(model) -> list[torch.Tensor]:
    return [t for layer in model.layers for t in (layer.attn.k_cache, layer.attn.v_cache)]


def prefill(model, device) -> None:
    """The real sequence's prompt, eagerly: positions 0..PROMPT-1 of slot SLOT."""
    ids = torch.arange(7, 7 + PROMPT, device=device) % TINY["vocab"]
    with torch.no_grad():
        model(ids, torch.arange(PROMPT, device=device), torch.full((PROMPT,), SLOT, device=device))


def decode_step(model_or_kiln, device):
    """The real sequence's next token (position PROMPT): its logits."""
    inputs = (torch.tensor([3], device=device), torch.tensor([PROMPT], device=device),
              torch.tensor([SLOT], device=device))
    if isinstance(model_or_kiln, KilnModel):  # with graphs, inputs go through kiln's static buffers
        inputs = model_or_kiln.place(*inputs)
    with torch.no_grad():
        return model_or_kiln(*inputs).clone()


def check_padding_never_touches_real_slots(device: str, mode: str) -> None:
    config = CompilationConfig(cudagraph_mode=mode)
    with building_with(config):
        model = build(**TINY, device=device)
    prefill(model, device)
    real = [cache[:PAD].clone() for cache in kv_caches(model)]
    # Positive controls: the prompt was written, the spare slot is still empty.
    assert all(cache[SLOT, :PROMPT].abs().sum() > 0 for cache in real)
    assert all(cache[PAD].abs().sum() == 0 for cache in kv_caches(model))

    kiln = KilnModel(model, config)
    kiln.compile([1, 2, 4])  # trace at 4 padding rows, compile, first run (and capture on CUDA)
    if kiln.uses_graphs(3):  # a decode batch of 3 other sequences, padded to the graph of 4
        others = torch.tensor([0, 2, 3], device=device)
        batch = (torch.tensor([1, 2, 3], device=device), torch.zeros(3, dtype=torch.long, device=device), others)
        with torch.no_grad():
            kiln(*kiln.place(*batch), decode=True)
        for before, cache in zip(real, kv_caches(model)):
            assert cache[others, 0].abs().sum() > 0  # the batch's own tokens were written
            before[others, 0] = cache[others, 0]  # those rows changed by right, nothing else may

    for before, cache in zip(real, kv_caches(model)):
        assert torch.equal(cache[:PAD], before), "a padding row wrote into a real sequence's slot"
    assert all(cache[PAD].abs().sum() > 0 for cache in kv_caches(model)), "the warm-up wrote nowhere"

    eager = build(**TINY, device=device)
    prefill(eager, device)
    torch.testing.assert_close(decode_step(kiln, device), decode_step(eager, device), rtol=1e-4, atol=1e-4)


def test_warmup_and_tracing_never_write_a_real_sequence():
    check_padding_never_touches_real_slots("cpu", "NONE")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["PIECEWISE", "FULL", "FULL_AND_PIECEWISE"])
def test_capture_and_padded_replay_never_write_a_real_sequence(mode):
    check_padding_never_touches_real_slots("cuda", mode)
