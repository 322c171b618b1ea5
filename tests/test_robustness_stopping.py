"""Online checkpoint selection: the robustness early-stopping handler (thesis chapter 4)."""

import json

import pytest
import torch
from ignite.engine import Engine

from medxfer.handlers import RobustnessEarlyStopping
from medxfer.transferability.robustness import first_local_maximum


def _trainer(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, batch):
        opt.zero_grad()
        loss = net(batch).pow(2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    return Engine(step)


@pytest.mark.parametrize("script, chosen, stopped", [
    ([0.9, 0.3, 0.5, 0.4, 0.6, 0.1], 2, 3),    # random init scores high: ignored; max at epoch 2
    ([0.9, 0.6, 0.2, 0.7, 0.8, 0.1], 1, 2),    # epoch 1 can be the maximum (thesis: most runs stop there)
    ([0.1, 0.2, 0.3, 0.3, 0.5, 0.6], None, None),  # rising (plateau continues): trains to the end
])
def test_scripted_scores_stop_one_round_after_the_first_local_maximum(script, chosen, stopped, tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    weights = {}
    scores = iter(script)

    def score_fn(network):
        return next(scores)

    handler = RobustnessEarlyStopping(net, "", score_fn=score_fn, output_dir=tmp_path)
    trainer = _trainer(net)
    handler.attach(trainer)

    @trainer.on(__import__("ignite").engine.Events.EPOCH_COMPLETED)
    def keep(engine):  # registered after the handler: weights as they were scored
        weights[engine.state.epoch] = {k: v.clone() for k, v in net.state_dict().items()}

    trainer.run([torch.randn(4, 3) for _ in range(2)], max_epochs=5)
    summary = json.loads((tmp_path / "robustness.json").read_text())
    assert summary["selected_epoch"] == chosen and summary["stopped_at_epoch"] == stopped
    assert trainer.state.epoch == (stopped if stopped is not None else 5)
    assert summary["epochs"] == list(range(trainer.state.epoch + 1)) and summary["robustness"] == script[:trainer.state.epoch + 1]
    if chosen is None:
        assert not (tmp_path / "robust_selected.pt").exists()
    else:
        saved = torch.load(tmp_path / "robust_selected.pt", weights_only=True)
        assert all(torch.equal(saved[k], weights[chosen][k]) for k in saved)
        assert not torch.equal(saved["weight"], net.weight.detach())  # not the last weights


def test_only_listed_epochs_are_scored_and_start_epoch_two_skips_epoch_one():
    net = torch.nn.Linear(3, 2)
    scores = iter([0.5, 0.9, 0.4, 0.8, 0.2])
    handler = RobustnessEarlyStopping(net, "", score_fn=lambda n: next(scores), epochs=[1, 3, 5, 7],
                                      start_epoch=2)
    trainer = _trainer(net)
    handler.attach(trainer)
    trainer.run([torch.randn(4, 3)], max_epochs=8)
    # scored at 0, 1, 3, 5, 7: epoch 1 (0.9 > 0.4) is not eligible, epoch 3 rises to 5, 5 (0.8 > 0.2) is it
    assert handler.scored_epochs == [0, 1, 3, 5, 7]
    assert handler.selected_epoch == 5 and trainer.state.epoch == 7
    assert first_local_maximum([0.5, 0.9, 0.4, 0.8, 0.2], [0, 1, 3, 5, 7], start_epoch=1) == 1


def test_real_robustness_is_measured_in_eval_mode_and_restores_training_mode():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 4, 3, padding=1))
    images = torch.rand(4, 3, 16, 16)
    handler = RobustnessEarlyStopping(net, "2", images=images, seed=3)
    net.train()
    first = handler.score()
    assert net.training and -1.5 <= first <= 1.0
    running = net[1].running_mean.clone()
    assert handler.score() == first and torch.equal(net[1].running_mean, running)  # eval mode: stats untouched
    with pytest.raises(ValueError, match="N >= 2"):
        RobustnessEarlyStopping(net, "2", images=images[:1])
