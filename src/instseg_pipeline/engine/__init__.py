"""Training: the typed config, the step loop and what is attached to it.

- `config`: ``TrainingConfig``, the ``training`` parameters block, built once in the node.
- `loop`: ``train`` (set-up, epochs, result) and ``train_one_epoch`` (the step loop).
- `callbacks`: the one kind of hook (``Callback``) and the built-ins: progress bar, loss
  logging, validation loss, checkpoints. `selection`: model selection, another callback.
- `checkpoint`: what a checkpoint holds, atomic writes, pruning, resume. `rng`: seeding and
  capturing the global RNG states. `losses`: weighted loss and validation loss.
- `ema`: ``ModelEMA``, the moving average of the weights (``training.ema``).
- `distributed`: the elastic launcher (torchrun semantics) and rank helpers.
- `fit`: training from the canonical tables (datasets, loaders, model, selection), what the
  training node calls.

Nothing is imported here, so ``engine.config`` loads without torch.
"""
