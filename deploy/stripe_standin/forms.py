"""Stripe's form encoding: ``a[b][c]=x``, arrays ``items[0][price]=p`` (or ``lookup_keys[]=k``).

``parse_form`` turns a body or query string into nested dicts and lists of strings; the ``as_*``
helpers coerce one value and raise Stripe-shaped errors naming the parameter.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from deploy.stripe_standin.errors import StripeError

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


def _set(target: dict[str, Any], parts: list[str], value: str, full_key: str) -> None:
    node: Any = target
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "":  # `a[]=x` appends
            part = str(sum(1 for k in node if str(k).isdigit())) if isinstance(node, dict) else "0"
        if last:
            node[part] = value
            return
        child = node.get(part)
        if not isinstance(child, dict):
            if child not in (None, ""):
                raise StripeError(f"Invalid parameter: {full_key}", param=full_key)
            child = {}
            node[part] = child
        node = child


def _listify(node: Any) -> Any:
    """Dicts whose keys are all digits become lists, ordered by index."""
    if not isinstance(node, dict):
        return node
    converted = {k: _listify(v) for k, v in node.items()}
    if converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


def parse_pairs(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        match = _KEY.match(key)
        if match is None:
            raise StripeError(f"Invalid parameter name: {key}", param=key)
        parts = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        _set(result, parts, value, key)
    listified = _listify(result)
    assert isinstance(listified, dict)
    return listified


def parse_form(data: bytes | str) -> dict[str, Any]:
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return parse_pairs(parse_qsl(text, keep_blank_values=True))


# -- coercion ----------------------------------------------------------------------------------------

def as_str(params: dict[str, Any], key: str, default: str | None = None, *, param: str | None = None) -> str | None:
    value = params.get(key)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise StripeError(f"Invalid string: {param or key}", param=param or key)
    return value


def require_str(params: dict[str, Any], key: str, *, param: str | None = None) -> str:
    value = as_str(params, key, param=param)
    if value is None:
        raise StripeError(f"Missing required param: {param or key}.", param=param or key, code="parameter_missing")
    return value


def as_int(params: dict[str, Any], key: str, default: int | None = None, *, param: str | None = None) -> int | None:
    value = params.get(key)
    if value is None or value == "":
        return default
    try:
        return int(str(value))
    except ValueError:
        raise StripeError(f"Invalid integer: {value}", param=param or key) from None


def as_bool(params: dict[str, Any], key: str, default: bool | None = None, *, param: str | None = None) -> bool | None:
    value = params.get(key)
    if value is None or value == "":
        return default
    if value in ("true", True):
        return True
    if value in ("false", False):
        return False
    raise StripeError(f"Invalid boolean: {value}", param=param or key)


def as_dict(params: dict[str, Any], key: str, *, param: str | None = None) -> dict[str, Any]:
    value = params.get(key)
    if value is None or value == "":
        return {}
    if isinstance(value, list):  # {"0": ...} became a list: Stripe would call it an invalid hash
        raise StripeError(f"Invalid hash: {param or key}", param=param or key)
    if not isinstance(value, dict):
        raise StripeError(f"Invalid hash: {param or key}", param=param or key)
    return value


def as_list(params: dict[str, Any], key: str, *, param: str | None = None) -> list[Any]:
    value = params.get(key)
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [value]
    raise StripeError(f"Invalid array: {param or key}", param=param or key)


def metadata_update(current: dict[str, str], params: dict[str, Any], key: str = "metadata") -> dict[str, str]:
    """Stripe's metadata merge: new keys set, ``key=""`` deletes, ``metadata=""`` clears everything."""
    if key not in params:
        return dict(current)
    value = params[key]
    if value == "":
        return {}
    if isinstance(value, list):  # keys "0", "1", ... were read as an array
        value = {str(i): v for i, v in enumerate(value)}
    if not isinstance(value, dict):
        raise StripeError(f"Invalid hash: {key}", param=key)
    merged = dict(current)
    for k, v in value.items():
        if not isinstance(v, str):
            raise StripeError(f"Invalid metadata value for {k}", param=f"{key}[{k}]")
        if v == "":
            merged.pop(k, None)
        else:
            merged[k] = v
    return merged
