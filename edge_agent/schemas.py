"""The JSON Schema of every message, in and out, generated from the typed models the code uses
(docs/schemas holds them; a test fails when they drift)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from edge_agent.commands import COMMAND_MODELS, MesAck
from edge_agent.messages import KIND_OF, SCHEMA_PREFIX, VERSION, StatusMessage

#: the JSON Schema dialect of the generated schemas
SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every message, by name (for the MES side), generated from the same
    pydantic models the agent writes, parses commands with and the MES simulator parses with:
    each outgoing kind, ``status``, and each command as ``command.{kind}`` (the MES's
    acknowledgements as ``command.mes-ack``)."""
    models: list[tuple[str, type[BaseModel], str]] = [
        (kind.value, model, "serialization") for model, kind in KIND_OF.items()
    ]
    models.append(("status", StatusMessage, "serialization"))
    models += [(f"command.{kind}", model, "validation") for kind, model in COMMAND_MODELS.items()]
    models.append(("command.mes-ack", MesAck, "validation"))
    out = {}
    for name, model, mode in models:
        schema = model.model_json_schema(by_alias=True, mode=mode)  # type: ignore[arg-type]
        if name.startswith("command.") and "schema" in schema.get("properties", {}):
            # defaults in the model, but the agent refuses a command without them
            schema["required"] = sorted({*schema.get("required", []), "schema", "version"})
        out[name] = {"$schema": SCHEMA_DRAFT, "$id": f"{SCHEMA_PREFIX}{name}/v{VERSION}", **schema}
    return out


def schema_files() -> dict[str, str]:
    """File name → text of every message kind's schema: ``{kind}.v{version}.schema.json``,
    stable (sorted keys, two-space indent, a final newline) so a drift shows as a diff."""
    return {
        f"{kind}.v{VERSION}.schema.json": json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for kind, schema in json_schemas().items()
    }


def write_schemas(directory: Path) -> list[Path]:
    """Write :func:`schema_files` into ``directory`` (created if missing); the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in schema_files().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
