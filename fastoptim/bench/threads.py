"""Threads: which thread count a row really used, and a ceiling on exactly that many
(fastoptim's serial threshold as the benchmark found it)."""
from .. import _config, _dispatch

_kernels = _config._kernels

#: the kernels calibrate a rule's serial threshold on its first steps of this many
#: elements at most (CALIBRATION_MAX in _kernels/runtime.pxi); larger steps never calibrate
_CALIBRATION_MAX = 1 << 18


class SerialPolicy:
    """fastoptim's serial threshold as the benchmark found it, and the two things the
    benchmark does with it.

    * :meth:`threads_used`: how many threads a fastoptim step of a rule really uses when
      given ``n``: 1 below the threshold in force (the rule's calibrated one, or the
      user's), else ``n``. Rows are compared with the ceiling on that many threads.
    * :meth:`force_exact` / :meth:`restore`: around the N-thread ceiling's blocks, the
      threshold of the running kernel module is set to 0 so that the traffic loop runs
      an N-thread team at every size (its own calibrated threshold differs from the
      rule's: ~23,000 elements against ~5,000 for Adam here), then put back as found.

    ``user`` is the threshold the user set (None: each rule calibrates its own), as
    ``fastoptim._dispatch`` keeps it; :meth:`restore` sets it back."""

    def __init__(self):
        self.user = _dispatch.serial_threshold()

    def restore(self):
        _config.set_serial_threshold(self.user)

    @staticmethod
    def force_exact():
        _config.set_serial_threshold(0)

    def threshold(self, rule, dtype):
        """Elements from which a step of ``rule`` in ``dtype`` runs a thread team."""
        if self.user is not None:
            return self.user
        cal = _kernels.calibration()["rules"].get(f"{rule.kernel}/{dtype}")
        return int(cal["threshold"]) if cal else int(_kernels.get_serial_threshold())

    def calibrated(self, rule, dtype):
        return self.user is not None or (f"{rule.kernel}/{dtype}"
                                         in _kernels.calibration()["rules"])

    def threads_used(self, rule, dtype, size, n):
        if n <= 1 or not _kernels.openmp_enabled() or _config._forked_child:
            return 1
        return n if size >= self.threshold(rule, dtype) else 1
