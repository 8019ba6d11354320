"""Training: the flow-matching objective, optimizer, sharded train state, train step, checkpoints and loop.

    from ernie_jax.training import loop
    loop.train(loop.TrainConfig(num_steps=1000), model_fn, data_iterator, "workdir/checkpoints", mesh=mesh)
"""
