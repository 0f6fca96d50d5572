"""The records domain of the generated corpus (see ``workbench.data.corpus``)."""

from __future__ import annotations

import calendar
import random
import re

# fmt: off
_FIRST_NAMES = (
    "Ada", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hugo", "Ivy", "Jonas",
    "Kira", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq",
)
_LAST_NAMES = (
    "Moreno", "Smith", "Okafor", "Nguyen", "Kowalski", "Silva", "Tanaka",
    "Berg", "Haddad", "Novak", "Reyes", "Fischer", "Patel", "Dubois",
)
# fmt: on
_ITEMS = (("lamp", 24), ("chair", 45), ("kettle", 18), ("notebook", 3), ("blanket", 32), ("mug", 6))
_DEPARTMENTS = ("sales", "support", "research", "finance", "design", "logistics")
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Osaka", "Lima", "Toronto", "Krakow", "Cairo", "Perth")
_CURRENCIES = ("EUR", "USD", "GBP", "JPY")
_STATUSES = ("paid", "pending", "refunded", "failed")


def _random_dates(rng: random.Random, n: int) -> list[str]:
    """n real calendar dates in ascending order, as YYYY-MM-DD."""
    dates = []
    for _ in range(n):
        year, month = rng.randint(2015, 2024), rng.randint(1, 12)
        day = rng.randint(1, calendar.monthrange(year, month)[1])
        dates.append((year, month, day))
    return [f"{y:04d}-{m:02d}-{d:02d}" for y, m, d in sorted(dates)]


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"


def _record_rows(rng: random.Random, table: str, n: int) -> list[dict[str, object]]:
    dates = _random_dates(rng, n)
    first_id = rng.randint(100, 9000)
    rows: list[dict[str, object]] = []
    for i in range(n):
        if table == "orders":
            item, base = rng.choice(_ITEMS)
            quantity = rng.randint(1, 9)
            unit_cents = base * 100 + rng.choice((0, 50, 99))
            rows.append(
                {
                    "order_id": first_id + i,
                    "date": dates[i],
                    "customer": _person(rng),
                    "item": item,
                    "quantity": quantity,
                    "unit_price": f"{unit_cents / 100:.2f}",
                    "total": f"{quantity * unit_cents / 100:.2f}",
                }
            )
        elif table == "employees":
            rows.append(
                {
                    "id": first_id + i,
                    "name": _person(rng),
                    "department": rng.choice(_DEPARTMENTS),
                    "city": rng.choice(_CITIES),
                    "start_date": dates[i],
                    "salary": rng.randint(30, 120) * 1000,
                }
            )
        elif table == "payments":
            rows.append(
                {
                    "txn": f"T{first_id + i:05d}",
                    "date": dates[i],
                    "payer": _person(rng),
                    "amount": f"{rng.randint(100, 99999) / 100:.2f}",
                    "currency": rng.choice(_CURRENCIES),
                    "status": rng.choice(_STATUSES),
                }
            )
        else:  # weather
            rows.append(
                {
                    "station": rng.choice(_CITIES),
                    "date": dates[i],
                    "temp_c": f"{rng.randint(-150, 380) / 10:.1f}",
                    "rain_mm": f"{rng.choice((0, 0, rng.randint(1, 400))) / 10:.1f}",
                    "wind_kmh": rng.randint(0, 90),
                }
            )
    return rows


def _json_value(value: object) -> str:
    """Numbers stay bare, text is quoted. Amounts are kept as their formatted strings, but unquoted."""
    if isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"-?\d+\.\d+", value)):
        return str(value)
    return f'"{value}"'


def records_document(rng: random.Random) -> str:
    """A small table of records, as CSV with a header or as JSON lines."""
    table = rng.choice(("orders", "employees", "payments", "weather"))
    rows = _record_rows(rng, table, rng.randint(3, 6))
    if rng.random() < 0.5:
        lines = [f"# {table}.csv", ",".join(rows[0])]
        lines += [",".join(str(v) for v in row.values()) for row in rows]
    else:
        lines = [f"# {table}.jsonl"]
        for row in rows:
            lines.append("{" + ", ".join(f'"{k}": {_json_value(v)}' for k, v in row.items()) + "}")
    return "\n".join(lines)
