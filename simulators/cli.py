"""The command line both PLC simulators share: serve a configuration's signals and produce at a
rate on every work centre, with a live table, until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable, Sequence
from decimal import Decimal
from fractions import Fraction
from typing import Protocol

from rich.console import Console
from rich.live import Live
from rich.table import Table

from edge_agent.config import Config, load_config
from edge_agent.errors import ConfigError
from simulators.feeds import LotChange, MeterStep


class SimulatedPlc(Protocol):
    """What both simulators offer (OPC UA and Modbus), so one command line and one scripted shift
    drive either."""

    #: every feed lot change, in the order made (:meth:`change_lot`)
    lot_changes: list[LotChange]

    @property
    def endpoint(self) -> str: ...
    @property
    def work_centres(self) -> list[str]: ...
    async def start(self, reset: bool = False) -> None: ...
    async def stop(self) -> None: ...
    def table(self) -> Table: ...
    async def set_order(
        self, work_centre: str, order_id: str, reset_counters: bool = True
    ) -> None: ...
    async def run_production(
        self,
        work_centre: str,
        units: int | None,
        rate_per_s: float,
        scrap_every: int = 0,
        *,
        batch: int = 1,
        flow_per_unit: int = 0,
        ack_timeout: float | None = None,
    ) -> None: ...
    async def set_flow_rate(
        self, work_centre: str, counts_per_s: Decimal | Fraction | int
    ) -> None: ...
    async def change_lot(self, work_centre: str, lot: str) -> LotChange: ...
    def meter_history(self, work_centre: str) -> list[MeterStep]: ...


async def _serve(plc: SimulatedPlc, args: argparse.Namespace, console: Console) -> None:
    await plc.start()
    try:
        for wc in plc.work_centres:
            await plc.set_order(wc, args.order)
        async with asyncio.TaskGroup() as tg:
            for wc in plc.work_centres:
                tg.create_task(
                    plc.run_production(
                        wc, None, args.rate, args.scrap_every, flow_per_unit=args.flow_per_unit
                    ),
                    name=f"produce[{wc}]",
                )
            with Live(plc.table(), console=console, refresh_per_second=4) as live:
                while True:
                    await asyncio.sleep(0.25)
                    live.update(plc.table())
    finally:
        await plc.stop()


def run_simulator(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    make_plc: Callable[[Config, str, int], SimulatedPlc],
    quiet_logger: str,
) -> int:
    """Parse, build the simulator, serve until Ctrl-C. Exit 2 on bad arguments or an invalid
    configuration, 1 when the port cannot be served."""
    args = parser.parse_args(argv)  # exits 2 on bad arguments
    # the library's own notes at every start (an unsecured endpoint, a connect attempt) are noise
    logging.getLogger(quiet_logger).setLevel(logging.ERROR)
    err = Console(stderr=True)
    if args.scrap_every < 0:
        err.print("error: --scrap-every must not be negative")
        return 2
    try:
        config = load_config(args.config)
        plc = make_plc(config, args.host, args.port)
    except ConfigError as exc:
        err.print(
            f"error: invalid configuration {str(args.config)!r}:", highlight=False, markup=False
        )
        for problem in exc.problems:
            err.print(f"  {problem}", highlight=False, markup=False)
        return 2
    except ValueError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        return 2
    try:
        asyncio.run(_serve(plc, args, Console()))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        err.print(f"error: cannot serve {plc.endpoint}: {exc}", highlight=False, markup=False)
        return 1
    return 0
