"""Master data: materials and versioned bills of materials, parsed, validated and frozen.

The JSON document (``materials`` and ``boms``) is the contract the MES will later send; the names
here are that contract (docs/masterdata.md). Typed models do the parsing, so a field error already
carries its path; a second pass checks what spans documents (unknown materials, phantom cycles,
densities, duplicate revisions) and names the BOM, the line and the field in every message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from edge_agent.domain.quantities import Rounding, conversion_factor, unit
from edge_agent.errors import InvalidDocumentError, MasterDataError, UnitError

#: Bounds on a decimal string on the wire. They keep every sum and difference of quantities exact
#: in Decimal's default 28-digit context, and no real quantity comes near them.
MAX_INTEGER_DIGITS = 15
MAX_DECIMAL_PLACES = 12


#: ASCII digits, an optional sign, point and exponent: what every MES and spreadsheet writes.
#: (Python's Decimal also takes "1_000", " 1 " and non-ASCII digits; the contract does not.)
_DECIMAL_SYNTAX = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", re.ASCII)


def parse_decimal(value: object) -> Decimal:
    """A decimal string (or a JSON integer) as an exact Decimal; anything else is refused.

    JSON numbers with a fraction are refused on purpose: they are floats to most JSON parsers and
    0.1 is not exactly 0.1 there.
    """
    if isinstance(value, bool):
        raise ValueError(f'must be a decimal string such as "1.5" (got {value!r})')
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, str):
        if not _DECIMAL_SYNTAX.fullmatch(value):
            raise ValueError(f'must be a decimal string such as "1.5" (got {value!r})')
        d = Decimal(value)
    else:
        raise ValueError(
            f'must be a decimal string such as "1.5" (got {type(value).__name__} {value!r}; '
            "quantities are exact decimal strings, never JSON numbers with a fraction)"
        )
    if not d.is_finite():
        raise ValueError(f"must be a finite decimal (got {value!r})")
    exponent = d.as_tuple().exponent
    assert isinstance(exponent, int)
    if -exponent > MAX_DECIMAL_PLACES:
        raise ValueError(f"has more than {MAX_DECIMAL_PLACES} decimal places (got {value!r})")
    if d.adjusted() >= MAX_INTEGER_DIGITS:
        raise ValueError(f"has more than {MAX_INTEGER_DIGITS} integer digits (got {value!r})")
    return d


def parse_timestamp(value: object) -> datetime:
    """An ISO-8601 date or date-time as an aware UTC datetime; a date means 00:00 UTC."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day, tzinfo=UTC)
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f'must be an ISO-8601 date or date-time such as "2026-01-31" (got {value!r})'
            ) from None
    else:
        raise ValueError(f"must be an ISO-8601 date or date-time string (got {value!r})")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


DecimalStr = Annotated[Decimal, BeforeValidator(parse_decimal)]
Timestamp = Annotated[datetime, BeforeValidator(parse_timestamp)]


class PostingMethod(StrEnum):
    """How a BOM line's consumption is posted."""

    BACKFLUSH = "backflush"  # theoretical quantity from the confirmed good + scrap
    WEIGH = "weigh"  # the actual, stable, in-tolerance scale quantity
    METER = "meter"  # the flow-meter totalizer delta
    MANUAL = "manual"  # never auto-posted


# --------------------------------------------------------------------------- wire documents


def _known_unit(code: str) -> str:
    try:
        unit(code)
    except UnitError as exc:
        raise ValueError(str(exc)) from None
    return code


class _Doc(BaseModel):
    # Unknown fields are refused: a misspelt "scrap_percent" silently ignored would be a wrong
    # quantity on every posting.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class MaterialDoc(_Doc):
    id: str = Field(min_length=1)
    uom: str
    increment: DecimalStr = Field(gt=0)
    rounding: Rounding = Rounding.HALF_UP
    density: DecimalStr | None = Field(default=None, gt=0)
    potency_managed: StrictBool = False
    serialized: StrictBool = False
    single_lot_per_operation: StrictBool = False
    description: str | None = None

    _known_uom = field_validator("uom")(classmethod(lambda cls, v: _known_unit(v)))


class AlternateDoc(_Doc):
    material: str = Field(min_length=1)
    factor: DecimalStr = Field(default=Decimal(1), gt=0)


def _alternate(value: object) -> object:
    return {"material": value} if isinstance(value, str) else value


class BomLineDoc(_Doc):
    material: str = Field(min_length=1)
    quantity: DecimalStr = Field(gt=0)
    uom: str
    operation: str = Field(min_length=1)
    method: PostingMethod = PostingMethod.BACKFLUSH
    scrap_pct: DecimalStr = Field(default=Decimal(0), ge=0, le=1000)
    setup_quantity: DecimalStr = Field(default=Decimal(0), ge=0)
    phantom: StrictBool = False
    alternates: tuple[Annotated[AlternateDoc, BeforeValidator(_alternate)], ...] = ()
    tolerance_pct: DecimalStr | None = Field(default=None, ge=0, le=100)
    description: str | None = None

    _known_uom = field_validator("uom")(classmethod(lambda cls, v: _known_unit(v)))

    @model_validator(mode="after")
    def _phantom_has_no_posting_fields(self) -> BomLineDoc:
        if self.phantom:
            given = [
                name
                for name in ("method", "alternates", "tolerance_pct")
                if name in self.model_fields_set
                and (name != "method" or self.method is not PostingMethod.BACKFLUSH)
            ]
            if given:
                raise ValueError(
                    f"a phantom line is exploded into its sub-BOM's lines: {', '.join(given)} "
                    "belong on those lines, not on the phantom"
                )
        return self


class BomDoc(_Doc):
    product: str = Field(min_length=1)
    revision: str = Field(min_length=1)
    effective_from: Timestamp | None = None
    base_quantity: DecimalStr = Field(default=Decimal(1), gt=0)
    uom: str
    lines: tuple[BomLineDoc, ...] = Field(min_length=1)
    description: str | None = None

    _known_uom = field_validator("uom")(classmethod(lambda cls, v: _known_unit(v)))


class MasterDataDoc(_Doc):
    """The master-data document: ``{"materials": [...], "boms": [...]}``."""

    materials: tuple[MaterialDoc, ...] = ()
    boms: tuple[BomDoc, ...] = ()


# --------------------------------------------------------------------------- domain values


@dataclass(frozen=True, slots=True)
class Material:
    id: str
    uom: str
    increment: Decimal
    rounding: Rounding
    density: Decimal | None = None
    potency_managed: bool = False
    serialized: bool = False
    single_lot_per_operation: bool = False

    @property
    def blind_backflush_forbidden(self) -> bool:
        """Potency-managed and serialized materials need an actual quantity or serial."""
        return self.potency_managed or self.serialized


@dataclass(frozen=True, slots=True)
class Alternate:
    material: str
    factor: Decimal = Decimal(1)


@dataclass(frozen=True, slots=True)
class BomLine:
    position: int  # 1-based position in the BOM document
    material: str
    quantity: Decimal
    uom: str
    operation: str
    method: PostingMethod = PostingMethod.BACKFLUSH
    scrap_pct: Decimal = Decimal(0)
    setup_quantity: Decimal = Decimal(0)
    phantom: bool = False
    alternates: tuple[Alternate, ...] = ()
    tolerance_pct: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Bom:
    product: str
    revision: str
    effective_from: datetime | None
    base_quantity: Decimal
    uom: str
    lines: tuple[BomLine, ...]

    @property
    def ref(self) -> str:
        return f"{self.product} rev {self.revision}"

    @property
    def operations(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(line.operation for line in self.lines))


@dataclass(frozen=True, slots=True)
class MasterData:
    """Validated, immutable master data."""

    materials: Mapping[str, Material]
    boms: Mapping[tuple[str, str], Bom]

    def material(self, material_id: str) -> Material:
        try:
            return self.materials[material_id]
        except KeyError:
            raise MasterDataError([f"unknown material {material_id!r}"]) from None

    def revisions(self, product: str) -> tuple[Bom, ...]:
        """Every revision of a product's BOM, oldest effective first."""
        found = [b for (p, _), b in self.boms.items() if p == product]
        return tuple(sorted(found, key=_effective_key))

    def bom(self, product: str, revision: str | None = None, as_of: datetime | None = None) -> Bom:
        """The BOM revision asked for, or the one in effect at ``as_of`` (latest when None)."""
        revisions = self.revisions(product)
        if not revisions:
            known = ", ".join(sorted({p for p, _ in self.boms})) or "none"
            raise MasterDataError([f"no BOM for product {product!r} (products: {known})"])
        if revision is not None:
            for b in revisions:
                if b.revision == revision:
                    return b
            known = ", ".join(b.revision for b in revisions)
            raise MasterDataError(
                [f"no revision {revision!r} of BOM {product!r} (revisions: {known})"]
            )
        in_effect = [
            b
            for b in revisions
            if as_of is None or b.effective_from is None or b.effective_from <= as_of
        ]
        if not in_effect:
            raise MasterDataError(
                [f"no revision of BOM {product!r} is in effect at {as_of:%Y-%m-%dT%H:%M:%SZ}"]
            )
        return in_effect[-1]


def _effective_key(b: Bom) -> datetime:
    return b.effective_from or datetime.min.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- loading


DocT = TypeVar("DocT", bound=BaseModel)


def parse_document(
    model: type[DocT],
    data: Mapping[str, Any] | str | bytes,
    error: type[InvalidDocumentError],
) -> DocT:
    """Parse a document (a mapping or JSON text) with its typed model; field errors become
    ``error`` with one message per problem, naming the document, the line and the field."""
    try:
        if isinstance(data, str | bytes):
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(describe_errors(exc, data)) from None


def load_master_data(data: Mapping[str, Any] | str | bytes) -> MasterData:
    """Parse and validate a master-data document; every problem found is reported at once."""
    return _build(parse_document(MasterDataDoc, data, MasterDataError))


def merge_master_doc(current: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` merged into ``current`` (both master-data JSON documents): materials by id,
    BOMs by (product, revision). What is new is added and what is the same is kept; a BOM
    revision already known with other content (a released revision never changes: publish a
    new one) or a material whose unit changes (lots and postings are in it) is an error, and
    so is anything but ``materials`` and ``boms`` at the top.
    """
    problems: list[str] = []
    if not isinstance(update, Mapping):
        raise MasterDataError(["master_data: must be an object with materials and boms"])
    for key in update:
        if key not in ("materials", "boms"):
            problems.append(f"master_data.{key}: unknown field (materials, boms)")
    materials = {m.get("id"): m for m in current.get("materials", [])}
    boms = {(b.get("product"), b.get("revision")): b for b in current.get("boms", [])}
    _check_update_shape(update)
    for i, m in enumerate(update.get("materials", [])):
        if not isinstance(m, Mapping):
            problems.append(f"master_data.materials[{i}]: must be an object")
            continue
        if not isinstance(m.get("id"), str):
            problems.append(
                f"master_data.materials[{i}].id: must be a string (got {m.get('id')!r})"
            )
            continue
        known = materials.get(m.get("id"))
        if known is not None and known.get("uom") != m.get("uom"):
            problems.append(
                f"master_data.materials[{i}] ({m.get('id')}).uom: {m.get('uom')!r} differs from "
                f"the known unit {known.get('uom')!r}: a material's issue unit never changes"
            )
        materials[m.get("id")] = dict(m)
    for i, b in enumerate(update.get("boms", [])):
        if not isinstance(b, Mapping):
            problems.append(f"master_data.boms[{i}]: must be an object")
            continue
        unnamed = [k for k in ("product", "revision") if not isinstance(b.get(k), str)]
        if unnamed:
            problems += [
                f"master_data.boms[{i}].{k}: must be a string (got {b.get(k)!r})" for k in unnamed
            ]
            continue
        ref = (b.get("product"), b.get("revision"))
        known_bom = boms.get(ref)
        if known_bom is not None and known_bom != b:
            problems.append(
                f"master_data.boms[{i}] ({ref[0]} rev {ref[1]}): revision {ref[1]} of "
                f"{ref[0]} is already known with other content: a released revision never "
                "changes, publish a new revision"
            )
        boms[ref] = dict(b)
    if problems:
        raise MasterDataError(problems)
    return {"materials": list(materials.values()), "boms": list(boms.values())}


def _check_update_shape(update: Mapping[str, Any]) -> None:
    """Materials and BOMs are lists (what each holds is checked item by item)."""
    problems = []
    for key in ("materials", "boms"):
        if not isinstance(update.get(key, []), list):
            value = update[key]
            problems.append(
                f"master_data.{key}: must be a list (got {type(value).__name__} {value!r:.40})"
            )
    if problems:
        raise MasterDataError(problems)


def describe_errors(exc: ValidationError, data: object) -> list[str]:
    """Pydantic errors as one message each, naming the document, the line and the field."""
    raw = _raw_for_paths(data)
    errors = exc.errors()
    # a list whose item failed is also reported "too short"; the item's error says more
    errors = [
        e
        for e in errors
        if not (
            e["type"] == "too_short"
            and any(
                o is not e and tuple(o["loc"][: len(e["loc"])]) == tuple(e["loc"]) for o in errors
            )
        )
    ]
    return [_describe(err, raw) for err in errors]


def _raw_for_paths(data: object) -> Any:
    if isinstance(data, str | bytes):
        import json  # noqa: PLC0415  (only needed to name documents in an error message)

        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            return None
    return data


def _describe(err: Any, raw: Any) -> str:
    """A pydantic error as `boms[0] (FG-100 rev C) › lines[2] (RM-7) › quantity: message`."""
    parts: list[str] = []
    node = raw
    loc: Sequence[int | str] = err["loc"]
    for i, key in enumerate(loc):
        if isinstance(key, int):
            label = f"[{key}]"
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                node = None
            name = _node_name(node)
            parts[-1] = parts[-1] + label + (f" ({name})" if name else "") if parts else label
        else:
            if err["type"] == "extra_forbidden" and i == len(loc) - 1:
                parts.append(f"{key}: unknown field (misspelt?)")
                return " › ".join(parts)
            parts.append(str(key))
            node = node.get(key) if isinstance(node, Mapping) else None
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if isinstance(value, Decimal):
        value = str(value)
    shown = (
        ""
        if isinstance(value, Mapping | list) or "got" in msg or repr(value) in msg
        else f" (got {value!r})"
    )
    where = " › ".join(parts) if parts else "document"
    return f"{where}: {msg}{shown}"


def _node_name(node: Any) -> str | None:
    if not isinstance(node, Mapping):
        return None
    if "product" in node:
        return f"BOM {node.get('product')} rev {node.get('revision')}"
    for key in ("lot", "material", "id"):
        if isinstance(node.get(key), str):
            return str(node[key])
    return None


def _build(doc: MasterDataDoc) -> MasterData:
    problems: list[str] = []
    materials: dict[str, Material] = {}
    for i, m in enumerate(doc.materials):
        if m.id in materials:
            problems.append(f"materials[{i}] ({m.id}) › id: duplicate material {m.id!r}")
            continue
        materials[m.id] = Material(
            id=m.id,
            uom=m.uom,
            increment=m.increment,
            rounding=m.rounding,
            density=m.density,
            potency_managed=m.potency_managed,
            serialized=m.serialized,
            single_lot_per_operation=m.single_lot_per_operation,
        )

    boms: dict[tuple[str, str], Bom] = {}
    where: dict[tuple[str, str], str] = {}
    for i, b in enumerate(doc.boms):
        key = (b.product, b.revision)
        here = f"boms[{i}] (BOM {b.product} rev {b.revision})"
        if key in boms:
            problems.append(
                f"{here} › revision: duplicate revision {b.revision!r} of {b.product!r} "
                f"(also {where[key]})"
            )
            continue
        where[key] = here
        boms[key] = Bom(
            product=b.product,
            revision=b.revision,
            effective_from=b.effective_from,
            base_quantity=b.base_quantity,
            uom=b.uom,
            lines=tuple(
                BomLine(
                    position=n,
                    material=ln.material,
                    quantity=ln.quantity,
                    uom=ln.uom,
                    operation=ln.operation,
                    method=ln.method,
                    scrap_pct=ln.scrap_pct,
                    setup_quantity=ln.setup_quantity,
                    phantom=ln.phantom,
                    alternates=tuple(Alternate(a.material, a.factor) for a in ln.alternates),
                    tolerance_pct=ln.tolerance_pct,
                )
                for n, ln in enumerate(b.lines, start=1)
            ),
        )

    master = MasterData(MappingProxyType(materials), MappingProxyType(boms))
    problems += _check_effectivity(master, where)
    for key, bom in boms.items():
        problems += _check_bom(master, bom, where[key])
    problems += _check_phantom_cycles(master)
    if problems:
        raise MasterDataError(problems)
    return master


def _check_effectivity(master: MasterData, where: Mapping[tuple[str, str], str]) -> list[str]:
    """Two revisions of one product in effect from the same moment leave no current one."""
    problems = []
    seen: dict[tuple[str, datetime | None], str] = {}
    for key, bom in master.boms.items():
        k = (bom.product, bom.effective_from)
        if k in seen:
            when = (
                f"from {bom.effective_from:%Y-%m-%dT%H:%M:%SZ}"
                if bom.effective_from
                else "with no effective_from"
            )
            problems.append(
                f"{where[key]} › effective_from: revisions {seen[k]!r} and {bom.revision!r} of "
                f"{bom.product!r} are both in effect {when}; give each its own effective_from"
            )
        else:
            seen[k] = bom.revision
    return problems


def _line_where(here: str, line: BomLine) -> str:
    return f"{here} › lines[{line.position - 1}] ({line.material})"


def _check_bom(master: MasterData, bom: Bom, here: str) -> list[str]:
    problems: list[str] = []
    for line in bom.lines:
        at = _line_where(here, line)
        if line.phantom:
            problems += _check_phantom_line(master, line, at)
            continue
        material = master.materials.get(line.material)
        if material is None:
            problems.append(f"{at} › material: unknown material {line.material!r}")
            continue
        problems += _check_conversion(at, "uom", line.uom, material)
        if line.method is PostingMethod.BACKFLUSH and material.blind_backflush_forbidden:
            flag = "potency_managed" if material.potency_managed else "serialized"
            problems.append(
                f"{at} › method: 'backflush' is not allowed for {flag} material "
                f"{material.id!r}; use 'weigh', 'meter' or 'manual'"
            )
        if line.method is PostingMethod.WEIGH and line.tolerance_pct is None:
            problems.append(f"{at} › tolerance_pct: a 'weigh' line needs a tolerance_pct")
        problems += _check_alternates(master, line, material, at)
    return problems


def _check_phantom_line(master: MasterData, line: BomLine, at: str) -> list[str]:
    revisions = master.revisions(line.material)
    if not revisions:
        return [f"{at} › phantom: no BOM for phantom assembly {line.material!r}"]
    phantom = master.materials.get(line.material)
    density = phantom.density if phantom is not None else None
    problems = []
    for sub in revisions:
        try:
            conversion_factor(line.uom, sub.uom, density)
        except UnitError as exc:
            hint = f" (set density on material {line.material!r})" if "density" in str(exc) else ""
            problems.append(f"{at} › uom: {exc} to explode into BOM {sub.ref}{hint}")
    return problems


def _check_alternates(master: MasterData, line: BomLine, material: Material, at: str) -> list[str]:
    problems = []
    for j, alt in enumerate(line.alternates):
        alt_at = f"{at} › alternates[{j}] ({alt.material})"
        alt_material = master.materials.get(alt.material)
        if alt_material is None:
            problems.append(f"{alt_at}: unknown material {alt.material!r}")
        elif alt.material == line.material:
            problems.append(f"{alt_at}: a material cannot be its own alternate")
        elif line.method is PostingMethod.BACKFLUSH and alt_material.blind_backflush_forbidden:
            flag = "potency_managed" if alt_material.potency_managed else "serialized"
            problems.append(
                f"{alt_at}: {flag} material {alt.material!r} cannot substitute on a "
                "'backflush' line (it would be posted blind)"
            )
        else:
            problems += _check_conversion(alt_at, "uom", material.uom, alt_material)
    return problems


def _check_conversion(at: str, field: str, from_uom: str, material: Material) -> list[str]:
    try:
        conversion_factor(from_uom, material.uom, material.density)
    except UnitError as exc:
        hint = f" (set density on material {material.id!r})" if "density" in str(exc) else ""
        return [f"{at} › {field}: {exc} for material {material.id!r}{hint}"]
    return []


def _check_phantom_cycles(master: MasterData) -> list[str]:
    """A phantom that contains itself, at any depth, can never be exploded."""
    graph: dict[str, set[str]] = {}
    for (product, _), bom in master.boms.items():
        graph.setdefault(product, set()).update(ln.material for ln in bom.lines if ln.phantom)
    problems: list[str] = []
    reported: set[frozenset[str]] = set()

    def visit(node: str, path: list[str]) -> None:
        for child in sorted(graph.get(node, ())):
            if child in path:
                cycle = [*path[path.index(child) :], child]
                if frozenset(cycle) not in reported:
                    reported.add(frozenset(cycle))
                    problems.append(f"BOM {cycle[0]} › phantom cycle: {' → '.join(cycle)}")
            else:
                visit(child, [*path, child])

    for product in sorted(graph):
        visit(product, [product])
    return problems
