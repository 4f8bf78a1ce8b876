"""User-facing errors: bad input that a user can fix, reported as one line with exit code 2."""


class KdbenchError(Exception):
    """Bad input: a message naming the culprit. The CLI prints it on one line and exits with code 2."""

    exit_code = 2


class NonFiniteLossError(KdbenchError):
    """Training produced a NaN or infinite loss; the run stops and is recorded as failed."""


class RanksOutOfStepError(KdbenchError):
    """Data parallel: a run failed on some ranks while the others were still inside a collective (training), so
    they cannot agree on its outcome. The launch stops (exit code 1); results written before it stay."""

    exit_code = 1
