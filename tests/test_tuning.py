"""hvdkit's measured Horovod/Open MPI defaults (hvdkit.tuning): set only where the user set nothing; a bad cycle time
is one line. What they do is measured by ``hvdkit bench train`` (README "Tuned defaults")."""
import pytest

from hvdkit.errors import HvdkitError
from hvdkit.tuning import HOROVOD_DEFAULTS, apply_defaults


def test_defaults_fill_only_what_the_user_left_unset():
    environ = {"OMPI_MCA_mpi_yield_when_idle": "0"}
    apply_defaults(environ)
    assert environ == {"HOROVOD_CYCLE_TIME": "2", "OMPI_MCA_mpi_yield_when_idle": "0",
                       "HOROVOD_FUSION_THRESHOLD": "4194304"}
    environ = {}
    apply_defaults(environ)
    assert environ == HOROVOD_DEFAULTS == {"HOROVOD_CYCLE_TIME": "2", "OMPI_MCA_mpi_yield_when_idle": "1",
                                           "HOROVOD_FUSION_THRESHOLD": "4194304"}
    environ = {"HOROVOD_ELASTIC": "1"}   # horovodrun's elastic workers: no fusion threshold (Horovod crashes on growth)
    apply_defaults(environ)
    assert "HOROVOD_FUSION_THRESHOLD" not in environ and environ["HOROVOD_CYCLE_TIME"] == "2"
    environ = {"HOROVOD_FUSION_THRESHOLD": "134217728"}   # Horovod's own default, asked for
    apply_defaults(environ)
    assert environ["HOROVOD_FUSION_THRESHOLD"] == "134217728"


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan"])
def test_a_cycle_time_horovod_would_read_as_zero_is_refused(value):
    with pytest.raises(HvdkitError, match=rf"^HOROVOD_CYCLE_TIME must be a number of milliseconds > 0 \(got '{value}'\)"):
        apply_defaults({"HOROVOD_CYCLE_TIME": value})


@pytest.mark.parametrize("value", ["64MB", "abc", "-1", "4.5", "\uff14"])   # a full-width digit: strtol reads 0
def test_a_fusion_threshold_horovod_would_misread_is_refused(value):
    """Horovod takes the leading digits: "64MB" was a 64-byte threshold, "abc" no fusion, without a word."""
    with pytest.raises(HvdkitError, match=rf"^HOROVOD_FUSION_THRESHOLD must be a whole number of bytes \(got "
                                          rf"'{value}'\); unset it \(hvdkit uses 4194304, 4 MiB\) or set e.g. "
                                          rf"HOROVOD_FUSION_THRESHOLD=67108864 for 64 MiB$"):
        apply_defaults({"HOROVOD_FUSION_THRESHOLD": value})
