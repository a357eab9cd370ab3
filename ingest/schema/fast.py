"""The fast path for valid records: a typed decoder compiled from input.schema.json.

The full classifier (jsonschema_rs + `validate.py`) explains every failure precisely, but it
needs the bytes parsed into Python objects first and then walks them again. Most records are
valid, so the decoder first tries this: msgspec decodes the bytes straight into a Struct whose
field types and constraints are generated here *from the schema file* (types, `const`, `enum`,
`pattern`, `minLength`/`maxLength`, `minimum`/`maximum`, `required`, `additionalProperties:
false`), in one pass in C. Known attributes get the same rules, checked in Python on the few
that are present by one function generated from the rules (`_attributes_check`: a lookup and
an inline test per known attribute). Formats (`date-time`, `email`) are checked by
jsonschema_rs on the one value.

The contract is one-sided: the fast path may refuse a valid record (it then takes the slow
path, which accepts it), but it never accepts one the full classifier refuses. So it is built
strictly: patterns match the whole string in ASCII (`\\Z`, not `$`, which also matches before a
final newline in Python), integers must be JSON integers (not `7.0`), and a keyword it does
not know turns the fast path off for that schema (`FastSchema.enabled` is False; a unit test
holds it on for the shipped schema). A property test checks the one-sided contract on
generated records.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from operator import attrgetter
from typing import Annotated, Any, Literal

import jsonschema_rs
import msgspec

from ingest.schema import load_schema

Check = Callable[[Any], bool]

# Keywords that only describe (no effect on validity), or that this module turns into checks.
_INERT = {"description", "title", "$comment", "examples", "default", "$schema", "$id"}
_STRING = {"type", "pattern", "minLength", "maxLength", "format", "enum", "const"}
_NUMBER = {"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "const"}
_FORMATS = ("date-time", "email")
_REMEMBERED = 1024


class Unsupported(Exception):
    """The schema uses something the fast path does not reproduce exactly."""


def strict_pattern(pattern: str) -> str:
    """A JSON Schema pattern as a Python regex with the same meaning for `re.search`.

    ECMA-262 `$` (no multiline) is the end of the string; Python's also matches before a final
    newline, so a trailing `$` becomes `\\Z`. ASCII classes only (`(?a)`). Anything else that
    reads differently between the two dialects is refused.
    """
    if re.search(r"\\[dDwWsSbBpPuxck]|\(\?|\[\[|\$.", pattern):
        raise Unsupported(f"pattern {pattern!r}")
    body = (
        pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith("\\$") else pattern
    )
    re.compile(body)
    return "(?a)" + body


def _remembering(search: Callable[[str], Any]) -> tuple[set[str], Callable[[str], bool]]:
    """`search(v) is not None`, remembered for the values seen (a Python regex call costs more
    than decoding a whole record; the values under a pattern — tenants, entity types,
    currencies — repeat). Bounded: forgets everything past _REMEMBERED values. Also returns
    the set of values found good, for callers that test it inline before calling."""
    good: set[str] = set()

    def matches(v: str) -> bool:
        if v in good:
            return True
        if search(v) is None:
            return False
        if len(good) >= _REMEMBERED:
            good.clear()
        good.add(v)
        return True

    return good, matches


def _cached(search: Callable[[str], Any]) -> Callable[[str], bool]:
    return _remembering(search)[1]


def _format_check(fmt: str) -> Check:
    if fmt not in _FORMATS:
        raise Unsupported(f"format {fmt!r}")
    validator = jsonschema_rs.validator_for(
        {"type": "string", "format": fmt}, validate_formats=True
    )
    is_valid: Check = validator.is_valid
    return is_valid


def _annotated(
    spec: dict[str, Any], patterns: dict[str, str] | None = None
) -> tuple[Any, str | None]:
    """(msgspec type, format to check afterwards) for one property. With `patterns`, a
    string's pattern is left out of the type and put there, to be checked through a cache."""
    keys = set(spec) - _INERT
    kind = spec.get("type")
    if "const" in spec:
        if keys - {"type", "const"} or type(spec["const"]) not in (int, str):
            raise Unsupported(f"const {spec['const']!r}")
        return Literal[spec["const"]], None
    if "enum" in spec:
        values = spec["enum"]
        if keys - {"type", "enum"} or not all(type(v) is str for v in values) or kind != "string":
            raise Unsupported(f"enum {values!r}")
        return Literal[tuple(values)], None
    if kind == "string":
        if keys - _STRING:
            raise Unsupported(f"string keywords {sorted(keys - _STRING)}")
        meta: dict[str, Any] = {}
        if "pattern" in spec and patterns is not None:
            patterns[""] = strict_pattern(spec["pattern"])
        elif "pattern" in spec:
            meta["pattern"] = strict_pattern(spec["pattern"])
        if "minLength" in spec:
            meta["min_length"] = spec["minLength"]
        if "maxLength" in spec:
            meta["max_length"] = spec["maxLength"]
        fmt = spec.get("format")
        if fmt is not None and fmt not in _FORMATS:
            raise Unsupported(f"format {fmt!r}")
        return (Annotated[str, msgspec.Meta(**meta)] if meta else str), fmt
    if kind == "integer":
        if keys - _NUMBER:
            raise Unsupported(f"integer keywords {sorted(keys - _NUMBER)}")
        bounds = {
            "ge": spec.get("minimum"),
            "le": spec.get("maximum"),
            "gt": spec.get("exclusiveMinimum"),
            "lt": spec.get("exclusiveMaximum"),
        }
        bounds = {k: v for k, v in bounds.items() if v is not None}
        if any(type(v) is not int for v in bounds.values()):
            raise Unsupported("non-integer bounds on an integer")
        return (Annotated[int, msgspec.Meta(**bounds)] if bounds else int), None
    if kind == "boolean" and keys <= {"type"}:
        return bool, None
    if kind == "object" and spec.get("additionalProperties") is True:
        return dict[str, Any], None
    raise Unsupported(f"property {spec!r}")


def _struct(
    name: str,
    spec: dict[str, Any],
    nested: dict[str, Any],
    patterns: dict[str, str] | None = None,
) -> type[msgspec.Struct]:
    """A Struct for an object schema with `additionalProperties: false`. With `patterns`, the
    string patterns of its fields go there (field -> regex) instead of into the types."""
    if spec.get("type") != "object" or spec.get("additionalProperties") is not False:
        raise Unsupported(f"{name}: only closed objects")
    if set(spec) - _INERT - {"type", "additionalProperties", "required", "properties"}:
        raise Unsupported(f"{name}: object keywords")
    required = set(spec.get("required", ()))
    fields: list[Any] = []
    for prop, sub in spec.get("properties", {}).items():
        if prop in nested:
            typ = nested[prop]
        else:
            found: dict[str, str] | None = {} if patterns is not None else None
            typ, fmt = _annotated(sub, found)
            if found:
                assert patterns is not None
                patterns[prop] = found[""]
            if fmt is not None and prop != "occurred_at":
                raise Unsupported(f"{name}.{prop}: format outside occurred_at")
        if prop in required:
            fields.append((prop, typ))
        elif "default" in sub:
            fields.append((prop, typ, msgspec.field(default=sub["default"])))
        else:
            raise Unsupported(f"{name}.{prop}: optional without a default")
    if not required <= {f[0] for f in fields}:
        raise Unsupported(f"{name}: a required field without a property")
    fields.sort(key=lambda f: len(f) == 3)  # required first: msgspec wants defaults last
    return msgspec.defstruct(name, fields, forbid_unknown_fields=True, gc=False)


def _attribute_rule(spec: dict[str, Any], at: int, names: dict[str, Any]) -> str:
    """The rules of one known attribute as a Python expression over its (parsed) value `v`;
    the values the expression needs go into `names`, suffixed with `at`."""
    keys = set(spec) - _INERT
    kind = spec.get("type")
    if kind == "string" and keys <= {"type", "pattern", "minLength", "maxLength", "format"}:
        rule = ["type(v) is str"]
        if "minLength" in spec:
            names[f"least{at}"] = spec["minLength"]
            rule.append(f"least{at} <= len(v)")
        if "maxLength" in spec:
            names[f"most{at}"] = spec["maxLength"]
            rule.append(f"len(v) <= most{at}")
        if "pattern" in spec:
            good, matches = _remembering(re.compile(strict_pattern(spec["pattern"])).search)
            names[f"good{at}"], names[f"matches{at}"] = good, matches
            rule.append(f"(v in good{at} or matches{at}(v))")
        if "format" in spec:
            names[f"format{at}"] = _format_check(spec["format"])
            rule.append(f"format{at}(v)")
        return " and ".join(rule)
    if kind in ("number", "integer") and keys <= {"type", "minimum", "maximum"}:
        # bool is no number: type(), not isinstance
        rule = ["type(v) is int" if kind == "integer" else "(type(v) is int or type(v) is float)"]
        if "minimum" in spec:
            names[f"low{at}"] = spec["minimum"]
            rule.append(f"low{at} <= v")
        if "maximum" in spec:
            names[f"high{at}"] = spec["maximum"]
            rule.append(f"v <= high{at}")
        return " and ".join(rule)
    if kind == "boolean" and keys <= {"type"}:
        return "type(v) is bool"
    raise Unsupported(f"attribute {spec!r}")


def _attributes_check(properties: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """One flat function testing the known attributes present in a dict against their rules
    (any other attribute is free): for each known name, a lookup and its rule written out
    inline, no loop and no call per attribute (it runs for every record). Generated from the
    schema's `attributes.properties`; names and values reach it through its globals only,
    never as source text."""
    names: dict[str, Any] = {"_MISSING": _MISSING}
    source = ["def attributes_ok(a):"]
    for at, (name, spec) in enumerate(properties.items()):
        rule = _attribute_rule(spec, at, names)
        names[f"name{at}"] = name
        source += [
            f"    v = a.get(name{at}, _MISSING)",
            f"    if v is not _MISSING and not ({rule}):",
            "        return False",
        ]
    source.append("    return True")
    exec("\n".join(source), names)  # the source: fixed fragments and generated names only
    check: Callable[[dict[str, Any]], bool] = names["attributes_ok"]
    return check


_MISSING = object()


class FastSchema:
    """The compiled fast path of one schema (the shipped one by default)."""

    def __init__(self, schema: dict[str, Any] | None = None) -> None:
        schema = schema if schema is not None else load_schema()
        self.enabled = False
        self.reason = ""
        self.known_attributes: frozenset[str] = frozenset()
        # The known attributes present in a dict follow their rules (any other is free).
        self.attributes_ok: Callable[[dict[str, Any]], bool] = lambda attributes: False
        self.patterned: tuple[tuple[str, Callable[[str], bool]], ...] = ()
        # The patterned fields' values of a record as one hashable (one C call), and the
        # combinations already found good: one set lookup per record (see `strings_ok`).
        self.strings_of: Callable[[Any], Any] = lambda env: ()
        self.good_strings: set[Any] = set()
        try:
            props = schema["properties"]
            relations = props.get("relations", {})
            nested: dict[str, Any] = {}
            if relations:
                if set(relations) - _INERT - {"type", "items"} or relations["type"] != "array":
                    raise Unsupported("relations")
                nested["relations"] = list[_struct("Relation", relations["items"], {})]  # type: ignore[misc]
            attributes = props["attributes"]
            if set(attributes) - _INERT - {"type", "additionalProperties", "properties"}:
                raise Unsupported("attributes keywords")
            known = attributes.get("properties", {})
            self.attributes_ok = _attributes_check(known)
            self.known_attributes = frozenset(known)
            patterns: dict[str, str] = {}
            self.envelope = _struct("Envelope", schema, nested, patterns)
            self.patterned = tuple(
                (prop, _cached(re.compile(regex).search)) for prop, regex in patterns.items()
            )
            if patterns:
                self.strings_of = attrgetter(*patterns)
            self.date_time = _format_check("date-time")
            self.decode = msgspec.json.Decoder(self.envelope).decode
            self.enabled = True
        except (Unsupported, KeyError, TypeError, re.error) as exc:
            self.reason = str(exc)

    def strings_ok(self, envelope: Any) -> bool:
        """The top-level string patterns (tenant_id, entity_type), through their caches. A
        good combination is remembered whole in `good_strings` (bounded), which the decoder's
        loop tests first: (tenant, entity type) pairs repeat far more than they vary."""
        key = self.strings_of(envelope)
        if key in self.good_strings:
            return True
        if not all(matches(getattr(envelope, prop)) for prop, matches in self.patterned):
            return False
        if len(self.good_strings) >= _REMEMBERED:
            self.good_strings.clear()
        self.good_strings.add(key)
        return True
