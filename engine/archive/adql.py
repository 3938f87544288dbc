"""ADQL to SQLite: parse with sqlglot (ADQL's TOP is T-SQL's), resolve names, rewrite the geometry.

The translation is structural, never a lookup of known queries:

* tables ``schema.table`` become the SQLite tables the database created for them, matched without
  regard to case (ADQL identifiers are case-insensitive), and keep their ADQL name as alias so
  qualified column references (``dbo.caomobservation.observationID``) still resolve;
* ``CONTAINS(POINT(...), POLYGON|CIRCLE(...))`` becomes a call to a registered SQLite function that
  returns 1 or 0, so both ``CONTAINS(...) = 1`` and ``1 = CONTAINS(...)`` work;
  ``DISTANCE(POINT, POINT)`` becomes a great-circle distance in degrees;
* ``TOP n`` and the job's MAXREC become one LIMIT, asking one row more than MAXREC so that an
  overflow can be told from a result that is exactly MAXREC rows long.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from engine.archive.geometry import SphericalPolygon

# Names of the SQLite functions tapdb registers for the geometry.
SQL_IN_POLYGON = "tap_in_polygon"  # (x, y, ra1, dec1, ra2, dec2, ...) -> 0/1
SQL_IN_CIRCLE = "tap_in_circle"  # (x, y, ra, dec, radius) -> 0/1
SQL_IN_REGION = "tap_in_region"  # (x, y, stc_s_text) -> 0/1
SQL_DISTANCE = "tap_distance"  # (ra1, dec1, ra2, dec2) -> degrees

# Output names for the functions the geometry was rewritten into: the ADQL name the user wrote.
_ADQL_FUNCTION_NAMES = {SQL_DISTANCE: "distance", SQL_IN_POLYGON: "contains", SQL_IN_CIRCLE: "contains",
                        SQL_IN_REGION: "contains"}  # fmt: skip
_GEOMETRY_NAMES = {"POINT", "POLYGON", "CIRCLE", "BOX", "REGION"}


class AdqlError(Exception):
    """A query the service refuses; the message is shown to the user as is."""


# Read-only members (properties), so that a frozen dataclass or a computed `sql_name` satisfies them.
class ColumnLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...


class TableLike(Protocol):
    @property
    def schema(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def sql_name(self) -> str: ...
    @property
    def column_map(self) -> Mapping[str, ColumnLike]: ...  # lowercase name -> column


@dataclass
class Translation:
    """SQLite text for one ADQL query, and what is known about its output columns."""

    sql: str
    # Output column name (lowercase) -> the table column it is a plain copy of, for metadata.
    sources: dict[str, ColumnLike] = field(default_factory=dict)
    # The names the output columns get, in order, when the projection names them (else empty).
    names: list[str] = field(default_factory=list)


def translate(adql: str, catalog: Mapping[tuple[str, str], TableLike], *, limit: int) -> Translation:
    """Translate one ADQL SELECT into SQLite, returning at most `limit` rows."""
    tree = _parse(adql)
    tables_by_alias = _resolve_tables(tree, catalog)
    _resolve_qualified_columns(tree, tables_by_alias)
    rewritten = tree.transform(_rewrite_geometry)
    _reject_leftover_geometry(rewritten)
    translation = Translation(sql="")
    limited: exp.Expr
    if isinstance(rewritten, exp.Select):
        _name_outputs(rewritten, tables_by_alias, translation)
        limited = _apply_limit(rewritten, limit)
    else:  # UNION / EXCEPT / INTERSECT (_parse admits nothing else): limit the combined result
        assert isinstance(rewritten, exp.SetOperation)
        limited = exp.select("*").from_(rewritten.subquery("_set")).limit(limit)
    translation.sql = limited.sql(dialect="sqlite")
    return translation


def _parse(adql: str) -> exp.Expression:
    if not adql or not adql.strip():
        raise AdqlError("the QUERY parameter is empty; send an ADQL SELECT statement")
    try:
        statements = [s for s in sqlglot.parse(adql, read="tsql") if s is not None]
    except ParseError as err:
        detail = err.errors[0] if err.errors else {}
        where = f" at line {detail.get('line')}, column {detail.get('col')}" if detail else ""
        near = f" near {detail.get('highlight')!r}" if detail.get("highlight") else ""
        description = str(detail.get("description", err)).split("<Token")[0].strip()
        raise AdqlError(f"syntax error{where}{near}: {description}") from None
    except TokenError as err:
        raise AdqlError(f"syntax error: {err}") from None
    if len(statements) != 1:
        raise AdqlError(f"send exactly one ADQL statement, got {len(statements)}")
    tree = statements[0]
    if isinstance(tree, exp.DML | exp.DDL | exp.Command | exp.Drop | exp.Alter | exp.Pragma):
        raise AdqlError(f"only SELECT queries are allowed, got {tree.key.upper()}")
    if not isinstance(tree, exp.Select | exp.SetOperation):
        raise AdqlError(f"syntax error: expected an ADQL SELECT statement, got {adql.strip()[:60]!r}")
    return tree


def _resolve_tables(
    tree: exp.Expression, catalog: Mapping[tuple[str, str], TableLike]
) -> dict[str, TableLike]:
    """Point every table reference at its SQLite table; return alias (lowercase) -> table."""
    by_alias: dict[str, TableLike] = {}
    cte_names = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    for table_node in list(tree.find_all(exp.Table)):
        name = table_node.name
        schema = table_node.db
        if not schema and name.lower() in cte_names:
            continue
        table = _lookup_table(catalog, schema, name)
        alias = table_node.alias or name
        if alias.lower() in by_alias and by_alias[alias.lower()] is not table:
            raise AdqlError(f"table alias {alias!r} is used twice; give each table its own alias")
        by_alias[alias.lower()] = table
        replacement = exp.table_(exp.to_identifier(table.sql_name, quoted=True))
        replacement.set("alias", exp.TableAlias(this=exp.to_identifier(alias, quoted=True)))
        table_node.replace(replacement)
    return by_alias


def _lookup_table(catalog: Mapping[tuple[str, str], TableLike], schema: str, name: str) -> TableLike:
    full = f"{schema}.{name}" if schema else name
    if schema:
        table = catalog.get((schema.lower(), name.lower()))
        if table is None:
            raise AdqlError(f"unknown table '{full}'; list the tables with a query on TAP_SCHEMA.tables")
        return table
    matches = [t for (_, t_name), t in catalog.items() if t_name == name.lower()]
    if not matches:
        raise AdqlError(f"unknown table '{full}'; list the tables with a query on TAP_SCHEMA.tables")
    if len(matches) > 1:
        choices = ", ".join(sorted(f"{t.schema}.{t.name}" for t in matches))
        raise AdqlError(f"table name '{name}' is ambiguous; qualify it with its schema ({choices})")
    return matches[0]


def _resolve_qualified_columns(tree: exp.Expression, by_alias: Mapping[str, TableLike]) -> None:
    """Rewrite ``schema.table.column`` and ``table.column`` to ``alias.column``."""
    for column in tree.find_all(exp.Column):
        qualifier = column.table
        if not qualifier:
            continue
        schema = column.db
        alias = _alias_for(qualifier, schema, by_alias)
        if alias is None:
            written = ".".join(p for p in (schema, qualifier, column.name) if p)
            raise AdqlError(f"unknown table '{qualifier}' in column reference '{written}'")
        column.set("table", exp.to_identifier(alias, quoted=True))
        column.set("db", None)
        column.set("catalog", None)


def _alias_for(qualifier: str, schema: str, by_alias: Mapping[str, TableLike]) -> str | None:
    # SQLite matches identifiers without regard to case, quoted or not, so lowercase aliases are fine.
    if not schema and qualifier.lower() in by_alias:
        return qualifier.lower()
    for alias, table in by_alias.items():
        if table.name.lower() == qualifier.lower() and (not schema or table.schema.lower() == schema.lower()):
            return alias
    return None


def _strip_frame(args: list[exp.Expression]) -> list[exp.Expression]:
    """Drop ADQL's optional leading coordinate-system string ('ICRS', '', ...)."""
    if args and isinstance(args[0], exp.Literal) and args[0].is_string:
        return args[1:]
    return args


def _geometry_call(node: exp.Expression) -> tuple[str, list[exp.Expression]] | None:
    if isinstance(node, exp.Anonymous) and str(node.this).upper() in _GEOMETRY_NAMES:
        return str(node.this).upper(), _strip_frame(list(node.expressions))
    return None


def _point_args(node: exp.Expression, where: str) -> list[exp.Expression]:
    call = _geometry_call(node)
    if call is None or call[0] != "POINT" or len(call[1]) != 2:
        raise AdqlError(f"{where} needs POINT('ICRS', ra, dec), got {node.sql(dialect='tsql')!r}")
    return call[1]


def _rewrite_geometry(node: exp.Expression) -> exp.Expr:
    if isinstance(node, exp.Contains):
        return _rewrite_contains(node.this, node.expression)
    if (
        isinstance(node, exp.Anonymous)
        and str(node.this).upper() == "CONTAINS"
        and len(node.expressions) == 2
    ):
        return _rewrite_contains(*node.expressions)
    if isinstance(node, exp.Anonymous) and str(node.this).upper() == "DISTANCE":
        args = list(node.expressions)
        if len(args) == 2:
            args = _point_args(args[0], "DISTANCE") + _point_args(args[1], "DISTANCE")
        if len(args) != 4:
            raise AdqlError(
                "DISTANCE needs two POINTs: DISTANCE(POINT('ICRS', ra1, dec1), POINT('ICRS', ra2, dec2))"
            )
        return exp.func(SQL_DISTANCE, *args)
    return node


def _rewrite_contains(point: exp.Expression, region: exp.Expression) -> exp.Expr:
    x, y = _point_args(point, "CONTAINS")
    call = _geometry_call(region)
    if call is None:
        if isinstance(region, exp.Column):  # an STC-S string column such as s_region
            return exp.func(SQL_IN_REGION, x, y, region)
        raise AdqlError(
            f"CONTAINS needs a POLYGON or CIRCLE as its second argument, got {region.sql(dialect='tsql')!r}"
        )
    shape, args = call
    if shape == "POLYGON":
        if len(args) < 6 or len(args) % 2:
            raise AdqlError(
                f"POLYGON needs at least 3 vertices as ra, dec pairs after the frame, got {len(args)} numbers"
            )
        _check_literal_polygon(args)
        return exp.func(SQL_IN_POLYGON, x, y, *args)
    if shape == "CIRCLE":
        if len(args) == 2:  # ADQL 2.1: CIRCLE(POINT(...), radius)
            args = [*_point_args(args[0], "CIRCLE"), args[1]]
        if len(args) != 3:
            raise AdqlError("CIRCLE needs a centre and a radius: CIRCLE('ICRS', ra, dec, radius_deg)")
        return exp.func(SQL_IN_CIRCLE, x, y, *args)
    raise AdqlError(f"{shape} is not supported in CONTAINS here; use POLYGON or CIRCLE")


def _check_literal_polygon(args: list[exp.Expression]) -> None:
    """Refuse a bad literal polygon now, with a message, rather than per row."""
    values = []
    for arg in args:
        number = _literal_number(arg)
        if number is None:
            return  # built from columns: checked when it runs
        values.append(number)
    try:
        SphericalPolygon.from_radec(list(zip(values[0::2], values[1::2], strict=True)))
    except ValueError as err:
        raise AdqlError(f"bad POLYGON: {err}") from None


def _literal_number(node: exp.Expression) -> float | None:
    sign = 1.0
    while isinstance(node, exp.Neg | exp.Paren):
        if isinstance(node, exp.Neg):
            sign = -sign
        node = node.this
    if isinstance(node, exp.Literal) and not node.is_string:
        return sign * float(node.this)
    return None


def _reject_leftover_geometry(tree: exp.Expr) -> None:
    for node in tree.find_all(exp.Anonymous):
        name = str(node.this).upper()
        if name in _GEOMETRY_NAMES:
            raise AdqlError(f"{name} can only be used inside CONTAINS or DISTANCE in this service")


def _name_outputs(select: exp.Select, by_alias: Mapping[str, TableLike], translation: Translation) -> None:
    """Give every output column a stable name, and remember which table column it copies."""
    from_aliases = _aliases_in_scope(select, by_alias)
    used: set[str] = set()
    new_projections: list[exp.Expr] = []
    for index, projection in enumerate(select.expressions):
        if isinstance(projection, exp.Star) or (
            isinstance(projection, exp.Column) and isinstance(projection.this, exp.Star)
        ):
            qualifier = projection.table if isinstance(projection, exp.Column) else ""
            scope = [qualifier.lower()] if qualifier else from_aliases or []
            for alias in scope:
                table = by_alias.get(alias)
                for column in table.column_map.values() if table else ():
                    translation.sources.setdefault(column.name.lower(), column)
                    translation.names.append(column.name)
                    used.add(column.name.lower())
            new_projections.append(projection)
            continue
        inner = projection.this if isinstance(projection, exp.Alias) else projection
        source = _column_source(inner, by_alias, from_aliases) if isinstance(inner, exp.Column) else None
        if isinstance(projection, exp.Alias):
            name = projection.alias
        elif source is not None:
            name = source.name
        elif isinstance(inner, exp.Func):
            name = (inner.name if isinstance(inner, exp.Anonymous) else inner.key).lower()
            name = _ADQL_FUNCTION_NAMES.get(name, name)
        else:
            name = f"col{index + 1}"
        name = _unique(name, used)
        if source is not None:
            translation.sources[name.lower()] = source
        translation.names.append(name)
        new_projections.append(exp.alias_(inner.copy(), exp.to_identifier(name, quoted=True)))
    select.set("expressions", new_projections)


def _aliases_in_scope(select: exp.Select, by_alias: Mapping[str, TableLike]) -> list[str] | None:
    """Aliases of the tables this SELECT reads; None when it also reads a subquery."""
    aliases = []
    sources = [select.args.get("from_") or select.args.get("from")]
    sources += [join for join in select.args.get("joins") or []]
    for source in sources:
        if source is None:
            continue
        table = source.this if isinstance(source.this, exp.Table) else None
        if table is None or not table.alias or table.alias.lower() not in by_alias:
            return None
        aliases.append(table.alias.lower())
    return aliases


def _column_source(
    column: exp.Column, by_alias: Mapping[str, TableLike], from_aliases: list[str] | None
) -> ColumnLike | None:
    name = column.name.lower()
    if column.table:
        table = by_alias.get(column.table.lower())
        return table.column_map.get(name) if table else None
    if from_aliases is None:
        return None  # reads a subquery: SQLite knows its columns
    owners = [by_alias[a].column_map[name] for a in from_aliases if name in by_alias[a].column_map]
    if not owners:
        raise AdqlError(
            f"unknown column '{column.name}'; list the columns with a query on TAP_SCHEMA.columns"
        )
    return owners[0] if len(owners) == 1 else None  # ambiguous: SQLite reports it


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate.lower() in used:
        n += 1
        candidate = f"{name}_{n}"
    used.add(candidate.lower())
    return candidate


def _apply_limit(select: exp.Select, limit: int) -> exp.Select:
    current = select.args.get("limit")
    if current is not None:
        value = _literal_number(current.expression)
        if value is None or value < 0 or value != int(value):
            raise AdqlError(f"TOP needs a non-negative whole number, got {current.expression.sql()!r}")
        limit = min(limit, int(value))
    return select.limit(limit)
