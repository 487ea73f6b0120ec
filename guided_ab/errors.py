"""Every error this package raises on purpose, in one tree, so callers can sort them by what to do next.

The tree (indentation = subclass):

* GuidedABError
  x UserError (also a ValueError)  the user can fix it; the CLI exits 2; never retried
    + ConfigError                  a config, a flag or another input is wrong (names the field or file)
    + RunStateError                the run lacks what the phase needs ("run the deploy phase first")
    + PhaseLocked                  another process is writing this phase of the run (names it)
  x ArmError (also a RuntimeError) an arm could not be started, reached or stopped; `.transient`
    + ArmNotReady                  transient: not answering at the deadline (cold start, refused connection, 503)
      - ModalNotReady              the same for a Modal app (also a ModalTargetError)
    + ArmRefused                   401/403: the endpoint refuses our key; waiting will not help
    + ServerStartError             a local server process died during start-up
    + ModalTargetError             a Modal app could not be deployed or stopped (transient if a network blip)
    + ModelError                   the embedded model could not be prepared
  x PhaseInterrupted (also a RuntimeError)  a phase stopped before its plan was done; a re-run resumes it
  x GuardrailBreach (also a RuntimeError)   the production canary broke a pre-registered guardrail

`ArmError.transient` is what the Prefect tasks' retry condition reads (tasks/retry.py): only a
transient error is worth a retry. The old bases (ValueError, RuntimeError) stay so that code
catching those keeps working.

Standard library only: guided_ab.arms.local_model imports this with the vLLM server's Python.
"""

from __future__ import annotations


class GuidedABError(Exception):
    """Base of every error raised on purpose by guided-ab."""


# -- the user can fix it ---------------------------------------------------------------------------
class UserError(GuidedABError, ValueError):
    """Bad input or a run not ready for the command: the message says what to change. CLI exit status 2."""


class ConfigError(UserError):
    """A config (or another user input) is wrong; the message names the field or file and the fix."""


class RunStateError(UserError):
    """A run is missing what a phase needs (endpoints, a key file): the message names the phase to run."""


class PhaseLocked(UserError):
    """Another process holds the phase's lock (one writer per phase of a run): the message names it."""


# -- an arm misbehaves -----------------------------------------------------------------------------
class ArmError(GuidedABError, RuntimeError):
    """An arm could not be started, reached or stopped.

    `transient` says whether trying again later may succeed: a class default that one instance
    may override (e.g. a Modal error that wraps a dropped connection).
    """

    transient: bool = False

    def __init__(self, message: str = "", *, transient: bool | None = None):
        super().__init__(message)
        if transient is not None:
            self.transient = transient


class ArmNotReady(ArmError):
    """The endpoint did not answer in time (still cold-starting, refusing connections, 503)."""

    transient = True


class ArmRefused(ArmError):
    """The endpoint answered 401/403: our API key is wrong or missing; no retry fixes that."""


class ServerStartError(ArmError):
    """A local vLLM server process exited during start-up; the message carries its log tail."""


class ModalTargetError(ArmError):
    """A Modal arm could not be deployed, reached or stopped; the message says what to check."""


class ModalNotReady(ArmNotReady, ModalTargetError):
    """A Modal app that did not answer in time: transient (ArmNotReady first in the MRO), and a
    ModalTargetError for callers that catch the Modal target's errors."""


class ModelError(ArmError):
    """The embedded model could not be converted or found."""


# -- a run stops short -----------------------------------------------------------------------------
class PhaseInterrupted(GuidedABError, RuntimeError):
    """The phase was stopped (Ctrl-C, cancellation) before its plan was done; re-run to resume."""


class GuardrailBreach(GuidedABError, RuntimeError):
    """The production canary broke a guardrail of its baseline experiment."""
