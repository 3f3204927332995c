"""TensorFlow and TFDS for data preparation only: kept off GPUs and TPUs, so JAX has them."""


def hide_accelerators_from_tf():
  """Makes TensorFlow see no GPU/TPU (call before it first touches a device)."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):
    pass  # already initialised, or no such device type
  return tf


def tfds_module():
  """``tensorflow_datasets``, imported after TF was kept off the accelerators."""
  hide_accelerators_from_tf()
  import tensorflow_datasets as tfds
  return tfds
