"""Named crash points, for the fault suite: the process kills itself (SIGKILL) at an exact moment.

A kill -9 from outside lands wherever the process happens to be, mostly waiting on a socket.
The moments where a crash could lose or double a posting are narrow (inside the commit, between
the commit and the publish, between a publish and its PUBACK, between the commit and the PLC
acknowledge), so the fault suite also arms them by name:

    EDGE_AGENT_CRASH_POINTS="store.before_commit:0.05,uplink.after_publish:0.02"

Each armed point kills the process with the given probability each time it is passed (after a
``crash_point`` log line, so a test can tell which point fired). Unset (the only way the agent
runs in production) every call is one dictionary lookup on an empty dictionary. The variable is
read once, when this module is imported.

The points, in the order a posting passes them:

- ``store.before_commit``: the transaction's rows are written, COMMIT not yet executed;
- ``engine.after_commit``: committed, the uplink not yet told there is something to publish;
- ``engine.before_plc_ack``: committed, the handshake acknowledge not yet written to the PLC;
- ``engine.after_plc_ack``: the acknowledge written, its new phase not yet committed;
- ``uplink.after_publish``: handed to the broker, its PUBACK not yet received;
- ``uplink.before_outbox_delete``: acknowledged, its outbox row not yet deleted.
"""

from __future__ import annotations

import os
import random
import signal
import sys

POINTS = (
    "store.before_commit",
    "engine.after_commit",
    "engine.before_plc_ack",
    "engine.after_plc_ack",
    "uplink.after_publish",
    "uplink.before_outbox_delete",
)
ENV = "EDGE_AGENT_CRASH_POINTS"


def parse(text: str) -> dict[str, float]:
    """``"name:probability,..."`` → {name: probability}; a bad entry raises ValueError."""
    armed: dict[str, float] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, _, p = entry.partition(":")
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown crash point {name!r} (known: {', '.join(POINTS)})")
        probability = float(p) if p else 1.0
        if not 0 < probability <= 1:
            raise ValueError(f"{ENV}: {name} probability must be in (0, 1], got {p!r}")
        armed[name] = probability
    return armed


_ARMED = parse(os.environ.get(ENV, ""))
_random = random.Random()


def crash_point(name: str) -> None:
    """Die here (SIGKILL, no clean-up of any kind) if ``name`` is armed and its chance comes."""
    probability = _ARMED.get(name)
    if probability is not None and _random.random() < probability:
        sys.stderr.write(f'{{"event": "crash_point", "point": "{name}"}}\n')
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
