"""Training: objectives (one file each under `objectives/`), the optimizer, the sharded train state of
named trainable parts, the train step, checkpoints and the loop.

    from ernie_jax.training import loop, optimizer, state
    from ernie_jax.training.objectives import flow_matching

    parts = {"transformer": state.TrainablePart(model_fn, optimizer.make_optimizer(optimizer.OptimizerConfig()))}
    loop.train(loop.TrainConfig(num_steps=1000), parts, flow_matching.FlowMatching(), data_iterator,
               "workdir/checkpoints", mesh=mesh)
"""
