"""One exception hierarchy for the whole agent, grouped by cause.

Adapters translate library errors into these at the boundary, so the rest of the code (and the
CLI, which maps them to exit codes) sees only these.
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base of every error the agent raises on purpose."""


class InputError(EdgeAgentError):
    """Something given to the agent is wrong: master data, a command, an argument.

    Nothing is changed by a rejected input. The message names the field and the value.
    """


class InvalidDocumentError(InputError):
    """A document (master data, staged lots, configuration) failed validation.

    ``problems`` holds one self-contained message per problem, each naming the document, the
    line and the field, so a user can fix them all in one pass.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(problems) if problems else "invalid document")


class MasterDataError(InvalidDocumentError):
    """Master data (materials, BOMs) failed validation."""


class UnitError(InputError):
    """A quantity cannot be expressed in the unit asked for (unknown unit, missing density)."""


class ConsumptionError(InputError):
    """A confirmation cannot be applied (e.g. a correction below what was confirmed)."""


class LotDataError(InvalidDocumentError):
    """Staged lot data failed validation."""


class SignalError(EdgeAgentError):
    """A PLC signal cannot be used: bad or uncertain quality, a value out of range."""


class ConfigError(InvalidDocumentError):
    """The agent's configuration failed validation; the agent does not start."""


class StoreError(EdgeAgentError):
    """The durable store cannot be used (damaged, newer schema, disk full)."""


class StoreFullError(StoreError):
    """The disk holding the store is full: nothing was written, and the store is intact.

    Not a reason to distrust the store: the agent holds its work and retries once there is
    space again (docs/durability.md)."""
