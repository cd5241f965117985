"""hvdkit's measured Horovod/Open MPI defaults (hvdkit.tuning): set only where the user set nothing; a bad cycle time
is one line. What they do is measured by ``hvdkit bench train`` (README "Tuned defaults")."""
import pytest

from hvdkit.errors import HvdkitError
from hvdkit.tuning import HOROVOD_DEFAULTS, apply_defaults


def test_defaults_fill_only_what_the_user_left_unset():
    environ = {"OMPI_MCA_mpi_yield_when_idle": "0"}
    apply_defaults(environ)
    assert environ == {"HOROVOD_CYCLE_TIME": "2", "OMPI_MCA_mpi_yield_when_idle": "0"}
    environ = {}
    apply_defaults(environ)
    assert environ == HOROVOD_DEFAULTS == {"HOROVOD_CYCLE_TIME": "2", "OMPI_MCA_mpi_yield_when_idle": "1"}


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan"])
def test_a_cycle_time_horovod_would_read_as_zero_is_refused(value):
    with pytest.raises(HvdkitError, match=rf"^HOROVOD_CYCLE_TIME must be a number of milliseconds > 0 \(got '{value}'\)"):
        apply_defaults({"HOROVOD_CYCLE_TIME": value})
