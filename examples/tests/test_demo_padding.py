"""Completions that stop early (vLLM and SGLang stop at the end-of-sequence token) are padded and
masked, so rewards and log-probabilities count only the generated tokens."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lightrft.testing import rank_threads
from lightrft_demo.train import pad_completions, sequence_logprobs


def test_pad_completions_masks_the_missing_positions():
    outs = [
        SimpleNamespace(prompt_token_ids=[5, 6], output_token_ids=[3, 3, 3]),
        SimpleNamespace(prompt_token_ids=[7, 8], output_token_ids=[3]),  # stopped early
    ]
    seqs, mask = pad_completions(outs, new_tokens=3, pad_id=0)
    assert seqs.tolist() == [[5, 6, 3, 3, 3], [7, 8, 3, 0, 0]]
    assert mask.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


def test_masked_logprobs_ignore_padding():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 10))
    seqs = torch.tensor([[1, 2, 3, 4, 0, 0]])
    with rank_threads():  # the function and the reference with one thread count, set here
        full = sequence_logprobs(model, seqs, prompt_len=2)
        masked = sequence_logprobs(model, seqs, prompt_len=2, mask=torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
        logp = torch.log_softmax(model(seqs).float()[:, :-1], -1).gather(-1, seqs[:, 1:, None]).squeeze(-1)
    # Bitwise by construction: the same forward and log_softmax; the masked positions add exact
    # zeros, so the masked sum is the sum of the two real log-probs in any order.
    assert torch.equal(masked, logp[:, 1:3].sum(-1))
    assert torch.equal(full, logp[:, 1:].sum(-1))
    assert bool((full < masked).all())  # the padding's two log-probs (each < 0) are left out
