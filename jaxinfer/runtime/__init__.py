"""Device side: the model runner (owner of device arrays and jax.jit) and the sampler."""
