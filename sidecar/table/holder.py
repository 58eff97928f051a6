"""The current table and its serving engine, which every transport reads and a reload swaps.

Below the decider, the reloader and the shadow table alike: each of them imports this, so
their imports point one way (decider -> shadow -> reload -> holder).
"""

import logging

from sidecar.core import Table
from sidecar.core.engine import Engine, engine_for

log = logging.getLogger("graysteer.decide")


class TableHolder:
    """The current table and its serving engine (sidecar.core.engine), built before the swap.
    Readers take `holder.table` or `holder.engine` once per request; a reload replaces both
    with one assignment, which is atomic for Python readers."""

    __slots__ = ("engine",)

    def __init__(self, table: Table) -> None:
        self.table = table

    @property
    def table(self) -> Table:
        return self.engine.table

    @table.setter
    def table(self, table: Table) -> None:
        self.engine = serving_engine(table)


def serving_engine(table: Table) -> Engine:
    """`table`'s engine: built ahead by the reload when it could (off the loop), else now;
    logged when it is the reference walk (the generator refused the table or failed)."""
    engine = engine_for(table)
    if engine.error is not None:
        log.error("rules %s served by the reference engine: %s", table.version, engine.error)
    return engine
