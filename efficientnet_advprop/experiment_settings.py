"""The settings an experiment derives from its config for either engine: the model's
build arguments and the training loop's TrainConfig. Imports neither TensorFlow nor
JAX (experiment.py runs the TF engine, jax_experiment.py the JAX engine)."""

from efficientnet_advprop.training.loop import TrainConfig


def model_kwargs(config, recipe, sync):
    """build_model keyword arguments of the config (unset values stay the model's)."""
    m = config.model
    kwargs = {"image_size": m.image_size, "preprocessing": m.preprocessing}
    if m.classifier_init not in (None, "official"):
        kwargs["classifier_init"] = m.classifier_init
    if m.width_multiplier != 1.0:
        kwargs["width_multiplier"] = m.width_multiplier
    if m.normalizer_free:
        if m.nf_stage_gains:
            kwargs["stage_gains"] = m.nf_stage_gains
        return {**kwargs, "dropout_rate": m.dropout_rate or 0.0,
                "drop_path_rate": m.drop_path_rate or 0.0}
    kwargs.update(normalizer=m.normalizer, num_aux=recipe.num_aux,
                  batch_norm_momentum=m.batch_norm_momentum,
                  batch_norm_epsilon=m.batch_norm_epsilon, synchronized=sync[0],
                  sync_group_size=sync[1])
    if m.model_name.startswith("efficientnet"):
        kwargs.update(dropout_rate=m.dropout_rate, survival_prob=(
            m.survival_prob if m.survival_prob is not None else 0.8))
    else:
        kwargs["dropout_rate"] = m.dropout_rate or 0.0
        if m.zero_init_last_bn:
            kwargs["zero_init_last_bn"] = True
    return kwargs


def summary_every_steps(config, set_by_user=True):
    """TensorBoard interval: at most an epoch; unset with several steps per loop, at
    least one loop (summaries would cut the loops short)."""
    every = min(config.run.summary_every_steps, config.optim.steps_per_epoch)
    if not set_by_user:
        every = max(every, config.run.iterations_per_loop)
    return every


def make_train_config(config, recipe, jit_compile=False):
    """The TrainConfig of a resolved ExperimentConfig."""
    optim, run, batch = config.optim, config.run, config.data.train_batch_size
    return TrainConfig(
        model_dir=run.model_dir, train_steps=optim.train_steps, global_batch_size=batch,
        steps_per_epoch=optim.steps_per_epoch, optimizer=optim.optimizer,
        base_learning_rate=optim.base_learning_rate, lr_schedule=optim.lr_schedule,
        lr_warmup_epochs=optim.lr_warmup_epochs, lr_warmup_start=optim.lr_warmup_start,
        lr_decay_epochs=optim.lr_decay_epoch, lr_decay_factor=optim.lr_decay_factor,
        lr_milestones=tuple(optim.lr_milestones or ()),
        lr_batch_size=recipe.lr_batch_size(batch), momentum=optim.momentum,
        nesterov=optim.nesterov, rmsprop_decay=optim.rmsprop_decay,
        rmsprop_epsilon=optim.rmsprop_epsilon, weight_decay=optim.weight_decay,
        agc_clip=optim.agc_clip, moving_average_decay=optim.moving_average_decay,
        seed=run.seed, jit_compile=jit_compile, iterations_per_loop=run.iterations_per_loop,
        precision=run.precision,
        checkpoint_every_steps=run.checkpoint_every_steps or optim.steps_per_epoch,
        keep_checkpoints=run.keep_checkpoints,
        summary_every_steps=summary_every_steps(
            config, config.sources.get("summary_every_steps", "set") == "set"))
