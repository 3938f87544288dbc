"""ADQL on SQLite: names, joins, LIKE, geometry, limits and error messages, without HTTP."""

from __future__ import annotations

import pytest

from engine.archive.tapdb import AdqlError, ColumnDef, TapDatabase

ROWS = [("a1", "TESS", 10.0, 20.0), ("b2", "TESS", 333.0, -37.0), ("C3", "HLSP", 0.5, 0.0)]


@pytest.fixture(scope="module")
def db() -> TapDatabase:
    database = TapDatabase()
    database.add_table(
        "ivoa",
        "obscore",
        [ColumnDef("obs_id", "char"), ColumnDef("obs_collection", "char"), ColumnDef("s_ra", "double"),
         ColumnDef("s_dec", "double")],
        ROWS,
    )  # fmt: skip
    columns = [ColumnDef("observationID", "char"), ColumnDef("sequenceNumber", "int")]
    database.add_table("dbo", "caomobservation", columns, [("a1", 1), ("b2", 2), ("C3", 2)])
    return database


def ids(db: TapDatabase, query: str, maxrec: int = 100) -> list[str]:
    table, _ = db.execute(query, maxrec=maxrec)
    return [str(v) for v in table[table.colnames[0]]]


def test_three_part_column_refs_join_and_alias(db: TapDatabase) -> None:
    table, overflowed = db.execute(
        "SELECT o.obs_id, dbo.caomobservation.sequenceNumber AS sector FROM ivoa.obscore AS o "
        "JOIN dbo.caomobservation ON dbo.caomobservation.OBSERVATIONID = o.obs_id "
        "WHERE sector = 2 ORDER BY o.obs_id",
        maxrec=10,
    )
    assert table.colnames == ["obs_id", "sector"] and list(table["obs_id"]) == ["C3", "b2"]
    assert not overflowed


def test_like_is_case_sensitive(db: TapDatabase) -> None:
    assert ids(db, "SELECT obs_id FROM ivoa.obscore WHERE obs_id LIKE 'c%'") == []
    assert ids(db, "SELECT obs_id FROM ivoa.obscore WHERE obs_id LIKE 'C%'") == ["C3"]


def test_in_between_not_and_or(db: TapDatabase) -> None:
    query = (
        "SELECT obs_id FROM ivoa.obscore WHERE (obs_collection IN ('TESS') AND NOT s_ra BETWEEN 300 AND 340) "
        "OR obs_id <> obs_id ORDER BY obs_id"
    )
    assert ids(db, query) == ["a1"]


def test_contains_either_side_and_circle(db: TapDatabase) -> None:
    wrap = "POLYGON('ICRS', 359, -1, 1, -1, 1, 1, 359, 1)"
    assert ids(
        db, f"SELECT obs_id FROM ivoa.obscore WHERE CONTAINS(POINT('ICRS', s_ra, s_dec), {wrap}) = 1"
    ) == ["C3"]
    assert ids(
        db, f"SELECT obs_id FROM ivoa.obscore WHERE 1 = CONTAINS(POINT('ICRS', s_ra, s_dec), {wrap})"
    ) == ["C3"]
    circle = "CIRCLE('ICRS', 333.5, -37, 1)"
    assert ids(
        db, f"SELECT obs_id FROM ivoa.obscore WHERE CONTAINS(POINT('ICRS', s_ra, s_dec), {circle}) = 1"
    ) == ["b2"]


def test_maxrec_and_top_overflow(db: TapDatabase) -> None:
    table, overflowed = db.execute("SELECT obs_id FROM ivoa.obscore ORDER BY obs_id", maxrec=2)
    assert len(table) == 2 and overflowed
    table, overflowed = db.execute("SELECT TOP 2 obs_id FROM ivoa.obscore ORDER BY obs_id", maxrec=2)
    assert len(table) == 2 and not overflowed
    table, overflowed = db.execute("SELECT obs_id FROM ivoa.obscore", maxrec=3)
    assert len(table) == 3 and not overflowed


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT nope FROM ivoa.obscore", "unknown column 'nope'"),
        ("SELECT obs_id FROM ivoa.missing", "unknown table 'ivoa.missing'"),
        ("SELECT obs_id FROM", "syntax error"),
        ("DELETE FROM ivoa.obscore", "only SELECT"),
        ("SELECT obs_id FROM ivoa.obscore WHERE CONTAINS(POINT('ICRS', s_ra, s_dec), "
         "POLYGON('ICRS', 1, 2, 3)) = 1", "POLYGON needs"),
        ("SELECT x.obs_id FROM ivoa.obscore", "unknown table 'x'"),
    ],
)  # fmt: skip
def test_errors_are_readable(db: TapDatabase, query: str, message: str) -> None:
    with pytest.raises(AdqlError, match=message):
        db.execute(query, maxrec=10)
    assert ids(db, "SELECT obs_id FROM ivoa.obscore WHERE obs_id = 'a1'") == ["a1"]  # still usable after
