"""What a table's columns must be to train on, said the same way for every format that has typed columns
(.csv, .parquet): numeric, and without missing cells. Real tabular data has text, categories and gaps; the
way in is scikit-learn's: ``PolyakClassifier`` in a ``Pipeline`` after a ``ColumnTransformer``."""

from __future__ import annotations

from polyak.contract.errors import DataError

ENCODE = ("encode it first: OneHotEncoder for categories, in a scikit-learn Pipeline with a ColumnTransformer "
          "before PolyakClassifier / PolyakRegressor (README: scikit-learn estimators), or as numbers in the file")
IMPUTE = ("fill or drop them first: SimpleImputer in a scikit-learn Pipeline before PolyakClassifier / "
          "PolyakRegressor, or in the file")


def check_column_type(pa, origin: str, name: str, kind) -> None:
    """DataError naming the file, the column and what to do, for a column that holds no numbers."""
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return
    if pa.types.is_null(kind):
        raise DataError(f"{origin}: column {name!r} is empty (every cell missing); drop it from the file")
    what = "categories" if pa.types.is_dictionary(kind) else "text" if pa.types.is_string(kind) or \
        pa.types.is_large_string(kind) else f"values of type {kind}"
    raise DataError(f"{origin}: column {name!r} holds {what}, not numbers; {ENCODE}")


def check_no_missing(origin: str, name: str, missing: int, first_row: int) -> None:
    """DataError for a column with missing cells (CSV: empty, or NA, NaN, null and the like)."""
    if missing:
        raise DataError(f"{origin}: column {name!r} has {missing} missing cell(s) (first in row {first_row}); "
                        f"{IMPUTE}")
