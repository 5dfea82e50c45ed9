"""ExtensibleTrainer: the step/injector/loss graph, the train loop, checkpoints, EMA, precision."""
