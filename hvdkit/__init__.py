"""hvdkit: PyTorch and TensorFlow/Keras 3 on Horovod ring-allreduce."""
__version__ = "0.1.0"
