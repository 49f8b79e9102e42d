import math

import pytest
import torch

from pyro_dkm._training import OptimiserSteps, shuffled_minibatches


def test_minibatches_cover_each_epoch_once():
    g = torch.Generator().manual_seed(3)
    batches = shuffled_minibatches(10, 4, generator=g)
    for _ in range(3):  # three epochs of ceil(10 / 4) = 3 slices
        epoch = [next(batches) for _ in range(3)]
        assert [len(b) for b in epoch] == [4, 4, 2]
        assert sorted(torch.cat(epoch).tolist()) == list(range(10))


def test_minibatches_reproducible_and_reshuffled():
    a = shuffled_minibatches(50, 50, generator=torch.Generator().manual_seed(0))
    b = shuffled_minibatches(50, 50, generator=torch.Generator().manual_seed(0))
    first, second = next(a), next(a)
    assert torch.equal(first, next(b))
    assert not torch.equal(first, second)


def test_minibatches_reject_bad_size():
    with pytest.raises(ValueError, match="batch_size"):
        next(shuffled_minibatches(5, 0))


def test_steps_minimise_and_record_per_point_loss():
    w = torch.nn.Parameter(torch.tensor(3.0))
    opt = torch.optim.SGD([w], lr=1 / 16)
    with OptimiserSteps(opt, total=20, num_data=4, desc="t", progress=False) as steps:
        for _ in range(20):
            steps(4 * (w - 1) ** 2)  # per point (w - 1)^2; w - 1 <- (w - 1)(1 - 8 lr)
    # SGD with lr 1/16 on 4 (w - 1)^2 halves (w - 1) each step: the history is exact.
    expected = [(2.0 * 0.5 ** k) ** 2 for k in range(20)]
    assert steps.step == 20
    assert steps.losses == pytest.approx(expected, rel=1e-12)


def test_steps_stop_on_callback_and_fail_on_nan():
    w = torch.nn.Parameter(torch.tensor(1.0))
    seen = []
    steps = OptimiserSteps(torch.optim.SGD([w], lr=0.1), total=5, num_data=1, desc="t",
                           progress=False, callback=lambda s, v: seen.append(s) or s == 2)
    assert not steps(w ** 2)
    assert steps(w ** 2)
    assert seen == [1, 2]
    with pytest.raises(FloatingPointError, match="step 3"):
        steps(w * math.nan)
