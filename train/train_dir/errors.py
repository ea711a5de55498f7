"""The ways a job ends early on purpose: each is printed as one `error:` line, with its own non-zero exit code."""


class UserError(Exception):
    """Bad input from the user (flags, data, checkpoints, paths): reported without a traceback."""


class Interrupted(Exception):
    """Training was stopped by a signal (Ctrl-C, or the platform preempting the job) between two steps."""

    def __init__(self, signum):
        import signal
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Diverged(Exception):
    """The loss became NaN or infinite: training cannot recover, so the job stops with the last good epoch kept."""
