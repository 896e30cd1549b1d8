"""A corpus of JSON Schemas for testing constrained decoding (structured output) on a tiny random-weight
model, where nothing but the grammar makes the output valid. Rule: everything is bounded, so that the grammar
itself forces the JSON text to be finite and short: every string has maxLength <= 12 or is an enum/const or
matches a bounded anchored pattern, every array has maxItems <= 4, every object has
``additionalProperties: false``, every number has both bounds and (if not an integer) a ``multipleOf`` that
bounds its fraction digits, and nesting is at most 4 containers deep.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

# What llguidance 1.9.1 does with these schemas (whitespace_flexible=False), found by feeding it bytes:
# - Separators are compact ("," and ":", no spaces) and object keys must come in the order of "properties";
#   optional keys may be left out but not reordered. SAMPLE_INSTANCES follow that order, so
#   json.dumps(instance, separators=(",", ":"), ensure_ascii=False) is text the grammar accepts.
# - In strings it allows only the escapes \" \\ \b \f \n \r \t and \u0000-\u001f (not \u00e9, not \/), so a
#   string of maxLength 12 may still take up to 74 bytes; anchored patterns such as ^[a-z]{1,6}$ allow no
#   escapes at all and are the tight way to bound a string.
# - An unanchored pattern is a substring search ("[a-z]{1,3}" accepts "xabcx1..."), so it bounds nothing:
#   every pattern here is anchored with ^...$.
# - "type": "number" with minimum/maximum bounds the integer part and forbids exponents, but the fraction is
#   unbounded ("0.123456789012345678901234567890" passes {"minimum": 0, "maximum": 1}). multipleOf with a
#   decimal step bounds it: the fraction gets at most as many digits as the step has (0.5 -> one digit,
#   0.25 -> two). Two catches:
#   * For a step like 0.25 the fraction must have exactly two digits: "2.50" and "2.75" pass but "2.5" (what
#     json.dumps(2.5) writes) is rejected. Steps with one fraction digit (0.5) accept json.dumps's text.
#   * jsonschema checks a float multipleOf by float division, so 0.3 is "not a multiple of 0.1". Only steps
#     that are exact binary fractions (0.5, 0.25) are used here, so every grammar output also passes
#     jsonschema.
# - "format": "date" is fixed-length and kept; "date-time" is not used (its fractional seconds are unbounded).
# - oneOf compiles only when llguidance can see that the branches are disjoint (different types, or objects
#   told apart by a const); otherwise it is an error (see UNSUPPORTED).


def _str(max_length: int, min_length: int = 0) -> Schema:
    schema: Schema = {"type": "string", "maxLength": max_length}
    if min_length:
        schema["minLength"] = min_length
    return schema


def _int(minimum: int, maximum: int) -> Schema:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def _pattern(pattern: str) -> Schema:
    return {"type": "string", "pattern": pattern}


def _bool() -> Schema:
    return {"type": "boolean"}


def _array(items: Schema, max_items: int, min_items: int = 0) -> Schema:
    return {"type": "array", "items": items, "minItems": min_items, "maxItems": max_items}


def _object(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    """A closed object; every property is required unless ``required`` says otherwise."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


def _with_defs(defs: dict[str, Schema], schema: Schema) -> Schema:
    return {"$defs": defs, **schema}


SCHEMAS: dict[str, Schema] = {
    # --- objects -------------------------------------------------------------------------------------------
    "flat_record": _object({"name": _str(12, 1), "age": _int(0, 120), "active": _bool()}),
    "optional_fields": _object(
        {"id": _int(1, 999), "nickname": _str(8), "score": _int(0, 100), "verified": _bool()},
        required=["id"],
    ),
    "all_optional": _object(
        {"color": {"type": "string", "enum": ["red", "green"]}, "size": _int(1, 5)},
        required=[],
    ),
    "empty_object": {"type": "object", "properties": {}, "additionalProperties": False},
    "nested_object": _object(
        {
            "user": _object(
                {
                    "name": _str(12, 1),
                    "address": _object({"city": _str(12, 1), "zip": _pattern("^[0-9]{5}$")}),
                }
            ),
            "admin": _bool(),
        }
    ),
    "depth_four": _object(
        {"level1": _object({"level2": _object({"level3": _object({"leaf": _int(0, 9), "flag": _bool()})})})}
    ),
    # --- integers and numbers ------------------------------------------------------------------------------
    "integer_range": _int(-100, 100),
    "integer_exclusive": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
    "integer_multiple_of": {"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 5},
    # multipleOf 0.5: at most one fraction digit (see the note at the top).
    "number_half_steps": {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.5},
    # multipleOf 0.25: the fraction, when present, is exactly two digits ("4.50", never "4.5").
    "number_quarter_exclusive": {
        "type": "number",
        "exclusiveMinimum": 0,
        "exclusiveMaximum": 5,
        "multipleOf": 0.25,
    },
    "measurement": _object(
        {
            "value": {"type": "number", "minimum": -100, "maximum": 100, "multipleOf": 0.5},
            "unit": {"type": "string", "enum": ["mm", "cm", "m"]},
            "error": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},
        }
    ),
    # --- strings -------------------------------------------------------------------------------------------
    "string_bounded_length": _str(12, 3),
    "string_pattern": _pattern("^[A-Z]{3}-[0-9]{2,4}$"),
    "string_pattern_alternation": _pattern("^(yes|no|maybe)$"),
    "string_hex_fixed": {"type": "string", "pattern": "^[0-9a-f]{4}$", "minLength": 4, "maxLength": 4},
    "string_enum": {"type": "string", "enum": ["red", "green", "blue"]},
    "string_date": {"type": "string", "format": "date"},
    # --- enum, const, booleans, null, unions --------------------------------------------------------------
    "const_fields": _object({"version": {"const": 2}, "kind": {"const": "ping"}, "id": _int(0, 99)}),
    "mixed_enum": {"enum": [1, "two", None, True, 3.5]},
    "enum_of_objects": {"enum": [{"op": "add", "n": 1}, {"op": "del"}, [1, 2]]},
    "boolean": _bool(),
    "null": {"type": "null"},
    "nullable_string": {"type": ["string", "null"], "maxLength": 10},
    "nullable_integer": {"type": ["integer", "null"], "minimum": 0, "maximum": 9},
    "scalar_union": {"type": ["integer", "boolean", "null"], "minimum": -5, "maximum": 5},
    # --- arrays --------------------------------------------------------------------------------------------
    "int_array": _array(_int(0, 9), max_items=4, min_items=1),
    "enum_array": _array({"enum": ["a", "b", "c"]}, max_items=3),
    "pair_of_booleans": _array(_bool(), max_items=2, min_items=2),
    "tuple": {
        "type": "array",
        "prefixItems": [_str(5), _int(0, 9), _bool()],
        "items": False,
        "minItems": 3,
        "maxItems": 3,
    },
    "object_array": _array(
        _object({"id": _int(1, 99), "tag": _pattern("^[a-z]{1,6}$")}),
        max_items=3,
        min_items=1,
    ),
    "nested_arrays": _array(_array(_int(0, 3), max_items=3), max_items=3),
    "object_with_arrays": _object(
        {
            "title": _str(12, 1),
            "tags": _array(_pattern("^[a-z]{1,8}$"), max_items=4),
            "scores": _array(_int(0, 10), max_items=4, min_items=1),
        },
        required=["title", "scores"],
    ),
    # --- anyOf, oneOf, allOf -------------------------------------------------------------------------------
    "any_of_scalars": {"anyOf": [_int(0, 9), _str(4), {"type": "null"}]},
    "any_of_objects": {
        "anyOf": [
            _object({"radius": _int(1, 10)}),
            _object({"width": _int(1, 10), "height": _int(1, 10)}),
        ]
    },
    # The branches are told apart by a const "kind", so llguidance accepts this oneOf.
    "one_of_tagged": {
        "oneOf": [
            _object({"kind": {"const": "cat"}, "lives": _int(1, 9)}),
            _object({"kind": {"const": "dog"}, "good": _bool()}),
        ]
    },
    # Branches of different types: disjoint, so accepted.
    "one_of_types": {"oneOf": [_bool(), _int(0, 5), _str(3)]},
    "all_of_refinement": {"allOf": [_int(0, 50), {"multipleOf": 5}]},
    # --- $defs and $ref ------------------------------------------------------------------------------------
    "ref_twice": _with_defs(
        {"point": _object({"x": _int(-9, 9), "y": _int(-9, 9)})},
        _object({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}),
    ),
    "ref_in_array": _with_defs(
        {"tag": _pattern("^[a-z]{2,6}$")},
        _object(
            {"primary": {"$ref": "#/$defs/tag"}, "others": _array({"$ref": "#/$defs/tag"}, max_items=3)},
            required=["primary"],
        ),
    ),
    # Four containers deep: root -> items (array) -> line_item -> money.
    "ref_chain": _with_defs(
        {
            "money": _object({"cents": _int(0, 9999), "currency": {"enum": ["EUR", "USD"]}}),
            "line_item": _object(
                {"sku": _pattern("^[A-Z]{2}[0-9]{2}$"), "qty": _int(1, 9), "price": {"$ref": "#/$defs/money"}}
            ),
        },
        _object(
            {
                "items": _array({"$ref": "#/$defs/line_item"}, max_items=2, min_items=1),
                "total": {"$ref": "#/$defs/money"},
                "note": {"type": ["string", "null"], "maxLength": 8},
            },
            required=["items", "total"],
        ),
    ),
    "nullable_ref": _with_defs(
        {"contact": _object({"handle": _pattern("^@[a-z]{1,8}$"), "priority": _int(1, 3)})},
        _object(
            {
                "primary": {"$ref": "#/$defs/contact"},
                "backup": {"anyOf": [{"$ref": "#/$defs/contact"}, {"type": "null"}]},
            }
        ),
    ),
    # --- the shape pydantic v2 emits -----------------------------------------------------------------------
    # Person.model_json_schema() from pydantic 2.14, for:
    #   class Address(BaseModel):  # model_config = ConfigDict(extra="forbid")
    #       city: str = Field(max_length=12); zip_code: str = Field(pattern=r"^[0-9]{5}$")
    #   class Person(BaseModel):  # model_config = ConfigDict(extra="forbid")
    #       name: str = Field(max_length=12); age: int = Field(ge=0, le=120); address: Address
    #       nickname: Optional[str] = Field(default=None, max_length=8)
    #       role: Literal["admin", "user"] = "user"
    "pydantic_person": {
        "$defs": {
            "Address": {
                "additionalProperties": False,
                "properties": {
                    "city": {"maxLength": 12, "title": "City", "type": "string"},
                    "zip_code": {"pattern": "^[0-9]{5}$", "title": "Zip Code", "type": "string"},
                },
                "required": ["city", "zip_code"],
                "title": "Address",
                "type": "object",
            }
        },
        "additionalProperties": False,
        "properties": {
            "name": {"maxLength": 12, "title": "Name", "type": "string"},
            "age": {"maximum": 120, "minimum": 0, "title": "Age", "type": "integer"},
            "address": {"$ref": "#/$defs/Address"},
            "nickname": {
                "anyOf": [{"maxLength": 8, "type": "string"}, {"type": "null"}],
                "default": None,
                "title": "Nickname",
            },
            "role": {"default": "user", "enum": ["admin", "user"], "title": "Role", "type": "string"},
        },
        "required": ["name", "age", "address"],
        "title": "Person",
        "type": "object",
    },
    # Order.model_json_schema() from pydantic 2.14, for (all models extra="forbid"):
    #   class Item(BaseModel):
    #       sku: str = Field(pattern=r"^[A-Z]{2}[0-9]{3}$"); quantity: int = Field(ge=1, le=9)
    #   class Address(BaseModel): city: str = Field(max_length=12); country: Literal["NO", "SE", "DK"]
    #   class Order(BaseModel):
    #       order_id: int = Field(ge=1, le=99999); items: list[Item] = Field(min_length=1, max_length=3)
    #       shipping: Optional[Address] = None; gift: bool = False
    "pydantic_order": {
        "$defs": {
            "Address": {
                "additionalProperties": False,
                "properties": {
                    "city": {"maxLength": 12, "title": "City", "type": "string"},
                    "country": {"enum": ["NO", "SE", "DK"], "title": "Country", "type": "string"},
                },
                "required": ["city", "country"],
                "title": "Address",
                "type": "object",
            },
            "Item": {
                "additionalProperties": False,
                "properties": {
                    "sku": {"pattern": "^[A-Z]{2}[0-9]{3}$", "title": "Sku", "type": "string"},
                    "quantity": {"maximum": 9, "minimum": 1, "title": "Quantity", "type": "integer"},
                },
                "required": ["sku", "quantity"],
                "title": "Item",
                "type": "object",
            },
        },
        "additionalProperties": False,
        "properties": {
            "order_id": {"maximum": 99999, "minimum": 1, "title": "Order Id", "type": "integer"},
            "items": {
                "items": {"$ref": "#/$defs/Item"},
                "maxItems": 3,
                "minItems": 1,
                "title": "Items",
                "type": "array",
            },
            "shipping": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}], "default": None},
            "gift": {"default": False, "title": "Gift", "type": "boolean"},
        },
        "required": ["order_id", "items"],
        "title": "Order",
        "type": "object",
    },
    # --- a bit of everything in one object -----------------------------------------------------------------
    "kitchen_sink": _object(
        {
            "id": _pattern("^[a-z]{2}[0-9]{2}$"),
            "count": _int(0, 1000),
            "ratio": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.5},
            "enabled": _bool(),
            "nothing": {"type": "null"},
            "level": {"enum": ["low", "mid", "high"]},
            "schema_version": {"const": 1},
            "label": {"type": ["string", "null"], "maxLength": 12},
            "flags": _array(_bool(), max_items=4),
            "meta": _object({"source": _str(8), "rank": _int(1, 3)}, required=["rank"]),
        },
        required=["id", "count", "enabled", "level", "schema_version", "meta"],
    ),
}

# One valid instance per schema, written by hand. Keys are in "properties" order (llguidance's order).
SAMPLE_INSTANCES: dict[str, object] = {
    "flat_record": {"name": "Ada", "age": 36, "active": True},
    "optional_fields": {"id": 7, "score": 42},
    "all_optional": {},
    "empty_object": {},
    "nested_object": {"user": {"name": "Bo", "address": {"city": "Oslo", "zip": "01234"}}, "admin": False},
    "depth_four": {"level1": {"level2": {"level3": {"leaf": 4, "flag": True}}}},
    "integer_range": -42,
    "integer_exclusive": 9,
    "integer_multiple_of": 35,
    "number_half_steps": -2.5,
    "number_quarter_exclusive": 4.75,
    "measurement": {"value": 12.5, "unit": "cm", "error": 0.25},
    "string_bounded_length": "hello",
    "string_pattern": "ABC-123",
    "string_pattern_alternation": "maybe",
    "string_hex_fixed": "beef",
    "string_enum": "green",
    "string_date": "2024-02-29",
    "const_fields": {"version": 2, "kind": "ping", "id": 5},
    "mixed_enum": "two",
    "enum_of_objects": {"op": "del"},
    "boolean": True,
    "null": None,
    "nullable_string": None,
    "nullable_integer": 3,
    "scalar_union": False,
    "int_array": [3, 1, 4],
    "enum_array": [],
    "pair_of_booleans": [True, False],
    "tuple": ["ab", 3, True],
    "object_array": [{"id": 1, "tag": "x"}, {"id": 2, "tag": "yz"}],
    "nested_arrays": [[0, 1], [], [3]],
    "object_with_arrays": {"title": "t", "scores": [1, 10]},
    "any_of_scalars": "abc",
    "any_of_objects": {"width": 2, "height": 3},
    "one_of_tagged": {"kind": "dog", "good": True},
    "one_of_types": 4,
    "all_of_refinement": 45,
    "ref_twice": {"start": {"x": 0, "y": 0}, "end": {"x": 3, "y": -4}},
    "ref_in_array": {"primary": "news", "others": ["tech", "ai"]},
    "ref_chain": {
        "items": [{"sku": "AB12", "qty": 2, "price": {"cents": 150, "currency": "EUR"}}],
        "total": {"cents": 300, "currency": "EUR"},
    },
    "nullable_ref": {"primary": {"handle": "@ann", "priority": 1}, "backup": None},
    "pydantic_person": {
        "name": "Kari",
        "age": 29,
        "address": {"city": "Bergen", "zip_code": "05003"},
        "nickname": None,
    },
    "pydantic_order": {
        "order_id": 1001,
        "items": [{"sku": "AB123", "quantity": 2}],
        "shipping": {"city": "Malmo", "country": "SE"},
        "gift": True,
    },
    "kitchen_sink": {
        "id": "ab12",
        "count": 7,
        "ratio": 0.5,
        "enabled": False,
        "level": "mid",
        "schema_version": 1,
        "label": "x",
        "meta": {"rank": 2},
    },
}

# Schemas that are valid JSON Schema but that llguidance 1.9.1 refuses: validate_grammar_with_warnings()
# returns is_err=True with the message given beside each. Otherwise bounded, like the corpus above.
UNSUPPORTED: dict[str, Schema] = {
    # 'Unimplemented keys: ["not"]'
    "not": {"type": "integer", "minimum": 0, "maximum": 9, "not": {"const": 5}},
    # 'Unimplemented keys: ["else", "if", "then"]'
    "if_then_else": {
        "type": "integer",
        "minimum": 0,
        "maximum": 9,
        "if": {"minimum": 5},
        "then": {"multipleOf": 2},
        "else": {"multipleOf": 3},
    },
    # 'Unimplemented keys: ["dependentSchemas"]'
    "dependent_schemas": {
        **_object({"a": _bool(), "b": _bool()}, required=[]),
        "dependentSchemas": {"a": {"required": ["b"]}},
    },
    # 'Unknown format: no-such-format'
    "unknown_format": {"type": "string", "maxLength": 12, "format": "no-such-format"},
    # 'Unimplemented keys: ["uniqueItems"]'
    "unique_items": {**_array(_int(0, 3), max_items=3), "uniqueItems": True},
    # Overlapping branches (both integers):
    # "oneOf constraints are not supported. Enable 'coerce_one_of' option to approximate oneOf with anyOf"
    "overlapping_one_of": {"oneOf": [_int(0, 5), _int(3, 9)]},
}
