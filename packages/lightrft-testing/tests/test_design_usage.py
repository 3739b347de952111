"""The usage snippet of DESIGN.md, verbatim, against FakeStrategy."""

import argparse

from lightrft.testing import causal_lm_loss, make_batches, make_tiny_model


def test_design_snippet_runs_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(
        strategy="fake", train_batch_size=4, micro_train_batch_size=2, bf16=False, seed=0,
        actor_learning_rate=5e-3, critic_learning_rate=5e-3, max_norm=1.0, lr_warmup_ratio=0.0,
    )  # fmt: skip
    actor, critic = make_tiny_model(1), make_tiny_model(2)
    reward_models, initial_model = [make_tiny_model(3)], make_tiny_model(1)
    max_steps = 16
    rows = make_batches(0, 1, 16)[0]
    dataset = [rows[i] for i in range(16)]
    losses = []

    def compute_loss(batch):
        loss = causal_lm_loss(actor, batch)
        losses.append(loss.item())
        return loss

    # ---- verbatim from DESIGN.md (dataloader from the strategy) ----
    from lightrft.strategy import StrategyBase, get_fake_strategy, get_strategy  # noqa: F401
    from lightrft.strategy.config import StrategyConfig  # noqa: F401

    strategy = get_strategy(args)  # args: argparse.Namespace, dict, StrategyConfig, any object
    dataloader = strategy.setup_dataloader(dataset, 2)
    (
        (actor, actor_optimizer, actor_scheduler),
        (critic, critic_optimizer, critic_scheduler),
        reward_models,
        initial_model,
    ) = strategy.prepare_models_and_optimizers(actor, critic, reward_models, initial_model, args, max_steps)
    for _epoch in range(4):
        for batch in dataloader:
            loss = compute_loss(batch)
            strategy.backward(loss, actor, actor_optimizer)
            strategy.optimizer_step(actor_optimizer, actor, actor_scheduler)
    strategy.save_ckpt(actor, "checkpoints")
    # ----------------------------------------------------------------

    assert isinstance(strategy, StrategyBase) and strategy.accumulated_gradient == 2
    assert len(losses) == 32 and sum(losses[-4:]) < sum(losses[:4])  # it learns
    assert strategy.train_state(actor).global_step == 16
    assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step16"
    # Frozen models are in eval mode without gradients; the critic got its own optimizer.
    assert not any(p.requires_grad for p in reward_models[0].parameters()) and not initial_model.training
    assert critic_optimizer is not actor_optimizer and critic_optimizer.param_groups[0]["lr"] > 0
    assert actor_scheduler.get_last_lr()[0] < 5e-3  # cosine decay moved the learning rate
