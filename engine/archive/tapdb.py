"""The local archive's catalogue database: an in-memory SQLite that answers ADQL.

Tables live in SQLite as ``<schema>__<table>``; `engine.archive.adql` maps ADQL names onto them.
TAP_SCHEMA (schemas, tables, columns, keys, key_columns) describes every table, itself included, so
clients can discover the columns. One connection serves every thread, behind a lock: SQLite work is
CPU-bound and the machine is small, so parallel readers would buy little.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy import units as u
from astropy.table import Column, MaskedColumn, Table

from engine.archive import adql
from engine.archive.adql import AdqlError
from engine.archive.geometry import SphericalPolygon, angular_distance_one, parse_stc_polygon
from engine.models import is_number

__all__ = ["AdqlError", "ColumnDef", "TableInfo", "TapDatabase"]

_SQLITE_TYPES = {
    "char": "TEXT",
    "boolean": "INTEGER",
    "short": "INTEGER",
    "int": "INTEGER",
    "long": "INTEGER",
    "float": "REAL",
    "double": "REAL",
}
_NUMPY_TYPES = {
    "boolean": np.bool_,
    "short": np.int16,
    "int": np.int32,
    "long": np.int64,
    "float": np.float32,
    "double": np.float64,
}
_TAP_SCHEMA = "TAP_SCHEMA"


@dataclass(frozen=True)
class ColumnDef:
    """One column of a catalogue table, as TAP_SCHEMA and VOSI describe it."""

    name: str  # exact spelling, e.g. "observationID"
    datatype: str  # TAP/VOTable datatype: "char", "int", "long", "double", "float", "boolean", "short"
    description: str = ""
    unit: str = ""
    ucd: str = ""
    indexed: bool = False
    utype: str = ""


@dataclass
class TableInfo:
    """A table the service offers: its ADQL names, SQLite name and columns."""

    schema: str
    name: str
    columns: list[ColumnDef]
    description: str = ""
    column_map: dict[str, ColumnDef] = field(default_factory=dict)  # lowercase name -> column

    @property
    def sql_name(self) -> str:
        return f"{self.schema.lower()}__{self.name.lower()}"

    @property
    def full_name(self) -> str:
        return f"{self.schema}.{self.name}"


# ADQL reserved words used as column names here; TAP 1.1 wants such names delimited in the metadata.
_RESERVED_COLUMN_NAMES = frozenset({"size"})


def delimited(name: str) -> str:
    """A column name as TAP_SCHEMA and VOSI publish it: quoted when it is an ADQL reserved word."""
    return f'"{name}"' if name.lower() in _RESERVED_COLUMN_NAMES else name


def _tap_schema_tables() -> list[tuple[str, list[ColumnDef], str]]:
    def c(name: str, datatype: str = "char", description: str = "") -> ColumnDef:
        return ColumnDef(name, datatype, description)

    return [
        ("schemas", [c("schema_name"), c("utype"), c("description"), c("schema_index", "int")], "schemas"),
        (
            "tables",
            [c("schema_name"), c("table_name"), c("table_type"), c("utype"), c("description"),
             c("table_index", "int")],
            "tables",
        ),
        (
            "columns",
            [c("table_name"), c("column_name"), c("datatype"), c("arraysize"), c("xtype"), c("size", "int"),
             c("utype"), c("description"), c("unit"), c("ucd"), c("indexed", "int"), c("principal", "int"),
             c("std", "int"), c("column_index", "int")],
            "columns",
        ),
        ("keys", [c("key_id"), c("from_table"), c("target_table"), c("utype"), c("description")], "keys"),
        ("key_columns", [c("key_id"), c("from_column"), c("target_column")], "key columns"),
    ]  # fmt: skip


# TAP 1.1 section 4: the foreign keys that link TAP_SCHEMA's own tables.
_TAP_SCHEMA_KEYS = (
    ("tables", "schema_name", "schemas", "schema_name"),
    ("columns", "table_name", "tables", "table_name"),
    ("keys", "from_table", "tables", "table_name"),
    ("keys", "target_table", "tables", "table_name"),
    ("key_columns", "key_id", "keys", "key_id"),
)


class TapDatabase:
    """Catalogue tables in SQLite, queried with ADQL."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA case_sensitive_like = ON")  # ADQL's LIKE is case-sensitive
        self._conn.execute("PRAGMA journal_mode = OFF")
        self._conn.execute("PRAGMA synchronous = OFF")
        self._tables: dict[tuple[str, str], TableInfo] = {}
        # Foreign keys: (key_id, from table, target table, description, [(from column, target column)]).
        self._keys: list[tuple[str, str, str, str, list[tuple[str, str]]]] = []
        self._tap_schema_stale = True
        self._udf_error = threading.local()
        self._polygons: dict[tuple, SphericalPolygon] = {}
        self._regions: dict[str, Any] = {}
        self._register_functions()
        for name, columns, description in _tap_schema_tables():
            self._create(_TAP_SCHEMA, name, columns, description)
        for from_table, from_column, target_table, target_column in _TAP_SCHEMA_KEYS:
            self._keys.append(
                (
                    f"tap_schema_{from_table}_{from_column}",
                    f"{_TAP_SCHEMA}.{from_table}",
                    f"{_TAP_SCHEMA}.{target_table}",
                    f"TAP_SCHEMA.{from_table}.{from_column} names a row of TAP_SCHEMA.{target_table}",
                    [(from_column, target_column)],
                )
            )

    def add_key(
        self, from_table: str, target_table: str, columns: Sequence[tuple[str, str]], *, description: str = ""
    ) -> None:
        """Declare a foreign key (a join path) in TAP_SCHEMA.keys / key_columns.

        `from_table` and `target_table` are `schema.table`; `columns` are (from column, target column).
        """
        for qualified, names in (
            (from_table, [f for f, _ in columns]),
            (target_table, [t for _, t in columns]),
        ):
            schema, _, name = qualified.partition(".")
            info = self._tables.get((schema.lower(), name.lower()))
            if info is None:
                raise ValueError(f"no table {qualified} for a foreign key")
            for column in names:
                if column.lower() not in info.column_map:
                    raise ValueError(f"no column {qualified}.{column} for a foreign key")
        key_id = f"{from_table}_{'_'.join(f for f, _ in columns)}".replace(".", "_").lower()
        self._keys.append((key_id, from_table, target_table, description, list(columns)))
        self._tap_schema_stale = True

    # -- loading ---------------------------------------------------------------------------------
    def add_table(
        self,
        schema: str,
        name: str,
        columns: Sequence[ColumnDef],
        rows: Iterable[Sequence],
        *,
        description: str = "",
    ) -> None:
        """Create `schema.name` and bulk-insert `rows` (sequences in `columns` order)."""
        if schema.upper() == _TAP_SCHEMA:
            raise ValueError("TAP_SCHEMA is maintained by the database itself")
        info = self._create(schema, name, columns, description)
        placeholders = ", ".join("?" * len(columns))
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(f'INSERT INTO "{info.sql_name}" VALUES ({placeholders})', rows)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            for column in columns:
                if column.indexed:
                    self.create_index(schema, name, column.name)

    def _create(self, schema: str, name: str, columns: Sequence[ColumnDef], description: str) -> TableInfo:
        key = (schema.lower(), name.lower())
        if key in self._tables:
            raise ValueError(f"table {schema}.{name} already exists")
        if not columns:
            raise ValueError(f"table {schema}.{name} needs at least one column")
        info = TableInfo(schema, name, list(columns), description)
        for column in columns:
            if column.datatype not in _SQLITE_TYPES:
                raise ValueError(
                    f"column {schema}.{name}.{column.name}: unknown datatype {column.datatype!r}; "
                    f"use one of {sorted(_SQLITE_TYPES)}"
                )
            if column.name.lower() in info.column_map:
                raise ValueError(f"column {column.name!r} appears twice in {schema}.{name}")
            info.column_map[column.name.lower()] = column
        ddl = ", ".join(f'"{c.name}" {_SQLITE_TYPES[c.datatype]}' for c in columns)
        with self._lock:
            self._conn.execute(f'CREATE TABLE "{info.sql_name}" ({ddl})')
            self._tables[key] = info
            self._tap_schema_stale = True
        return info

    def create_index(self, schema: str, name: str, column: str) -> None:
        """Index `column` of `schema.name` (and mark it indexed in TAP_SCHEMA)."""
        info = self._tables.get((schema.lower(), name.lower()))
        if info is None or column.lower() not in info.column_map:
            raise ValueError(f"no column {schema}.{name}.{column} to index")
        with self._lock:
            self._conn.execute(
                f'CREATE INDEX IF NOT EXISTS "ix_{info.sql_name}_{column.lower()}" '
                f'ON "{info.sql_name}" ("{column}")'
            )
            current = info.column_map[column.lower()]
            if not current.indexed:
                indexed = ColumnDef(current.name, current.datatype, current.description, current.unit,
                                    current.ucd, True, current.utype)  # fmt: skip
                info.column_map[column.lower()] = indexed
                info.columns = [indexed if c is current else c for c in info.columns]
                self._tap_schema_stale = True

    def foreign_keys(self, full_name: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
        """Keys from table `full_name`: (target table, description, [(from column, target column)])."""
        wanted = full_name.lower()
        return [(dst, text, pairs) for _id, src, dst, text, pairs in self._keys if src.lower() == wanted]

    def tables(self) -> list[TableInfo]:
        """Every table, TAP_SCHEMA's included, in schema then creation order."""
        return sorted(
            self._tables.values(), key=lambda t: (t.schema.upper() == _TAP_SCHEMA, t.schema.lower())
        )

    # -- querying --------------------------------------------------------------------------------
    def execute(
        self, adql_text: str, *, maxrec: int, cancel: threading.Event | None = None
    ) -> tuple[Table, bool]:
        """Run an ADQL query; return (at most `maxrec` rows, whether more rows matched).

        Thread-safe. Raises `AdqlError` with a readable message for anything the user can fix.
        `cancel`, when set while the query runs, interrupts it (AdqlError "aborted").
        """
        if maxrec < 0:
            raise AdqlError(f"MAXREC must be >= 0, got {maxrec}")
        translation = adql.translate(adql_text, self._tables, limit=maxrec + 1)
        with self._lock:
            self._refresh_tap_schema()
            self._udf_error.value = None
            if cancel is not None:
                self._conn.set_progress_handler(lambda: 1 if cancel.is_set() else 0, 20_000)
            try:
                cursor = self._conn.execute(translation.sql)
                names = [d[0] for d in cursor.description]
                rows = cursor.fetchall()
            except sqlite3.Error as err:
                raise self._translate_error(err) from None
            finally:
                if cancel is not None:
                    self._conn.set_progress_handler(None, 0)
        overflowed = len(rows) > maxrec
        return _to_table(names, rows[:maxrec], translation), overflowed

    def _translate_error(self, err: sqlite3.Error) -> AdqlError:
        message = str(err)
        udf_error = getattr(self._udf_error, "value", None)
        if udf_error is not None:
            return AdqlError(f"bad geometry: {udf_error}")
        if message.startswith("no such column: "):
            return AdqlError(
                f"unknown column '{message.removeprefix('no such column: ')}'; "
                "list the columns with a query on TAP_SCHEMA.columns"
            )
        if message.startswith("ambiguous column name: "):
            column = message.removeprefix("ambiguous column name: ")
            return AdqlError(f"ambiguous column '{column}'; qualify it with its table name")
        if message.startswith("no such function: "):
            return AdqlError(f"unknown function '{message.removeprefix('no such function: ')}'")
        if message == "interrupted":
            return AdqlError("the query was aborted")
        return AdqlError(f"query failed: {message}")

    # -- TAP_SCHEMA ------------------------------------------------------------------------------
    def _refresh_tap_schema(self) -> None:
        if not self._tap_schema_stale:
            return
        tables = self.tables()
        schemas = sorted({t.schema for t in tables}, key=lambda s: (s.upper() == _TAP_SCHEMA, s.lower()))
        schema_rows = [(s, None, f"the {s} schema", i) for i, s in enumerate(schemas)]
        table_rows = [(t.schema, t.full_name, "table", None, t.description, i) for i, t in enumerate(tables)]
        column_rows = [
            (
                t.full_name, delimited(c.name), c.datatype, "*" if c.datatype == "char" else None, None, None,
                c.utype or None, c.description, c.unit or None, c.ucd or None, int(c.indexed), 1,
                int(t.schema.lower() in ("ivoa", "tap_schema")), i,
            )
            for t in tables
            for i, c in enumerate(t.columns)
        ]  # fmt: skip
        key_rows = [(key_id, src, dst, None, text or None) for key_id, src, dst, text, _ in self._keys]
        key_column_rows = [(key_id, f, t) for key_id, _s, _d, _t, pairs in self._keys for f, t in pairs]
        self._conn.execute("BEGIN")
        tap_rows = (
            ("schemas", schema_rows),
            ("tables", table_rows),
            ("columns", column_rows),
            ("keys", key_rows),
            ("key_columns", key_column_rows),
        )
        for name, rows in tap_rows:
            sql_name = f"tap_schema__{name}"
            self._conn.execute(f'DELETE FROM "{sql_name}"')
            if rows:
                placeholders = ", ".join("?" * len(rows[0]))
                self._conn.executemany(f'INSERT INTO "{sql_name}" VALUES ({placeholders})', rows)
        self._conn.execute("COMMIT")
        self._tap_schema_stale = False

    # -- geometry functions ----------------------------------------------------------------------
    def _register_functions(self) -> None:
        def guarded(function: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                try:
                    return function(*args)
                except (ValueError, TypeError) as err:
                    self._udf_error.value = str(err)  # SQLite only says "user-defined function raised"
                    raise

            return call

        self._conn.create_function(adql.SQL_IN_POLYGON, -1, guarded(self._in_polygon), deterministic=True)
        self._conn.create_function(adql.SQL_IN_CIRCLE, 5, guarded(_in_circle), deterministic=True)
        self._conn.create_function(adql.SQL_IN_REGION, 3, guarded(self._in_region), deterministic=True)
        self._conn.create_function(adql.SQL_DISTANCE, 4, guarded(_distance), deterministic=True)

    def _in_polygon(self, x: float | None, y: float | None, *coords: float) -> int | None:
        if x is None or y is None:
            return None
        polygon = self._polygons.get(coords)
        if polygon is None:
            if len(coords) < 6 or len(coords) % 2:
                raise ValueError(f"POLYGON needs ra, dec pairs for at least 3 vertices, got {coords}")
            polygon = SphericalPolygon.from_radec(list(zip(coords[0::2], coords[1::2], strict=True)))
            if len(self._polygons) > 1024:  # footprints from columns: keep memory bounded
                self._polygons.clear()
            self._polygons[coords] = polygon
        return int(polygon.contains_one(x, y))

    def _in_region(self, x: float | None, y: float | None, region: str | None) -> int | None:
        if x is None or y is None or not region:
            return None
        shape = self._regions.get(region)
        if shape is None:
            shape = _parse_stc_region(region)
            if len(self._regions) > 4096:
                self._regions.clear()
            self._regions[region] = shape
        if isinstance(shape, SphericalPolygon):
            return int(shape.contains_one(x, y))
        ra0, dec0, radius = shape
        return int(angular_distance_one(x, y, ra0, dec0) <= radius)


def _parse_stc_region(text: str) -> SphericalPolygon | tuple[float, float, float]:
    words = text.split()
    if words and words[0].upper() == "CIRCLE":
        numbers = [w for w in words[1:] if is_number(w)]
        if len(numbers) != 3:
            raise ValueError(f"STC-S circle needs ra dec radius: {text[:80]!r}")
        ra, dec, radius = map(float, numbers)
        return ra, dec, radius
    return SphericalPolygon.from_radec(parse_stc_polygon(text))


def _in_circle(x: float | None, y: float | None, ra0: float, dec0: float, radius: float) -> int | None:
    if x is None or y is None:
        return None
    if radius is None or radius < 0:
        raise ValueError(f"CIRCLE radius must be >= 0 degrees, got {radius}")
    return int(angular_distance_one(x, y, ra0, dec0) <= radius)


def _distance(ra1: float | None, dec1: float | None, ra2: float | None, dec2: float | None) -> float | None:
    if ra1 is None or dec1 is None or ra2 is None or dec2 is None:
        return None
    return angular_distance_one(ra1, dec1, ra2, dec2)


def _to_table(names: list[str], rows: list[tuple], translation: adql.Translation) -> Table:
    """Rows from SQLite as an astropy Table, typed and described from the table columns they copy."""
    names = translation.names if len(translation.names) == len(names) else names
    table = Table()
    used: set[str] = set()
    for index, name in enumerate(names):
        values = [row[index] for row in rows]
        source = translation.sources.get(name.lower())
        datatype = source.datatype if source is not None else _infer_datatype(values)
        unique = name
        n = 1
        while unique.lower() in used:
            n += 1
            unique = f"{name}_{n}"
        used.add(unique.lower())
        table[unique] = _make_column(unique, values, datatype, source)
    return table


def _infer_datatype(values: list) -> str:
    for value in values:
        if isinstance(value, bool):
            return "boolean"
        if isinstance(value, int):
            return "long"
        if isinstance(value, float):
            return "double"
        if value is not None:
            return "char"
    return "char"


def _make_column(name: str, values: list, datatype: str, source: Any) -> Column:
    missing = [v is None for v in values]
    if datatype == "char":
        data = np.array(["" if v is None else str(v) for v in values], dtype=str)
    elif datatype in ("float", "double"):
        data = np.array([np.nan if v is None else v for v in values], dtype=_NUMPY_TYPES[datatype])
        missing = [False] * len(values)  # NaN is how VOTable floats say "no value"
    else:
        data = np.array([0 if v is None else v for v in values], dtype=_NUMPY_TYPES[datatype])
    kwargs: dict[str, Any] = {"name": name}
    if source is not None:
        if source.description:
            kwargs["description"] = source.description
        if getattr(source, "unit", ""):
            kwargs["unit"] = u.Unit(source.unit, parse_strict="silent")
        meta = {key: getattr(source, key, "") for key in ("ucd", "utype")}
        if any(meta.values()):
            kwargs["meta"] = {key: value for key, value in meta.items() if value}
    if any(missing):
        return MaskedColumn(data, mask=missing, **kwargs)
    return Column(data, **kwargs)
