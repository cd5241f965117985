"""The one place per framework that tells a lost peer (roll back and retry) from the user's own error (stop)."""
import pytest


def test_torch_lost_peer_is_horovods_typed_error_only():
    pytest.importorskip("torch")
    from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt
    from hvdkit.torch.process import is_peer_lost
    assert is_peer_lost(HorovodInternalError("ring broken"))
    assert not is_peer_lost(RuntimeError("CUDA out of memory"))
    assert not is_peer_lost(HostsUpdatedInterrupt(False))       # a host change syncs; it does not roll back


def test_keras_lost_peer_is_a_tf_error_naming_a_horovod_collective():
    tf = pytest.importorskip("tensorflow")
    from horovod.common.exceptions import HorovodInternalError
    from hvdkit.keras.process import GRADIENT_ALLREDUCE, PEER_LOST_MARK, is_peer_lost
    assert GRADIENT_ALLREDUCE.startswith(PEER_LOST_MARK)
    node = f"Connection closed by peer [127.0.0.1]:40813 [[{{{{node {GRADIENT_ALLREDUCE}}}}}]]"
    assert is_peer_lost(tf.errors.UnknownError(None, None, node))
    assert is_peer_lost(HorovodInternalError("from horovod.tensorflow.elastic"))
    user = "Matrix size-incompatible: In[0]: [4,6], In[1]: [5,8] [[{{node sequential/dense/MatMul}}]]"
    assert not is_peer_lost(tf.errors.InvalidArgumentError(None, None, user))
    assert not is_peer_lost(ValueError("bad input"))
