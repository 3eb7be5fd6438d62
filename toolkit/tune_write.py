"""`invoke tune --write`: the chosen settings into invoke.yaml (cloudrun.cpu, .memory, .concurrency) or fly.toml
([http_service.concurrency] soft_limit and hard_limit, [[vm]] size and memory), edited as text so that every other
line and comment stays as it is; a comment above the keys names the run. Each edit is parsed back and compared with
the file before it: only the named keys may differ, or nothing is written.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml
from invoke import Context, Exit

from toolkit.defaults import config_path

MARK = "# invoke tune "  # the run's comment line starts so; a later run replaces it


def run_comment(document: dict) -> str:
    run, choice = document["run"], document["choice"]
    return (f"{MARK}{run['date']}: model sha256 {run.get('model_sha256', '')[:16]}, p99 <= "
            f"{document['slo']['p99_ms']:g} ms; {choice['shape']} chosen at {choice['usd_per_million']:.4f} USD per "
            "million predictions (docs/sizing.md)")  # fmt: skip


def write(c: Context, document: dict) -> list[str]:
    """Apply the run's choice to the target's file; the lines describing what changed."""
    choice = document["choice"]
    if choice is None:
        raise Exit("tune --write: no shape met the objective, so nothing was written")
    settings, comment = choice["settings"], run_comment(document)
    if document["target"] == "cloudrun":
        path = record_path(c, "cloudrun")
        values = {"cpu": settings["cpu"], "memory": settings["memory"], "concurrency": settings["concurrency"]}
        _replace(path, set_yaml_keys(_read(path), "cloudrun", values, comment))
        return [f"{path}: " + ", ".join(f"cloudrun.{k}={v}" for k, v in values.items())]
    path = record_path(c, "fly")
    tables = {"http_service.concurrency": {"soft_limit": settings["soft_limit"], "hard_limit": settings["hard_limit"]},
              "[vm]": {"size": settings["size"], "memory": settings["memory"]}}  # fmt: skip
    _replace(path, set_toml_keys(_read(path), tables, comment))
    return [f"{path}: " + ", ".join(f"{t.strip('[]')}.{k}={v}" for t, keys in tables.items() for k, v in keys.items())]


def record_path(c: Context, target: str) -> Path:
    """The file `--write` edits for TARGET: tune.record, else the invoke.yaml Invoke read; or fly.config."""
    if target == "cloudrun":
        return Path(c.tune.record) if c.tune.record else config_path(c)
    return Path(c.fly.config)


def sizing_hint(c: Context, target: str) -> str:
    """One line for a deploy whose instance settings no `invoke tune --write` measured; empty when one did."""
    if target not in ("cloudrun", "fly"):
        return ""
    try:
        measured = MARK.strip() in record_path(c, target).read_text()
    except OSError:
        measured = False
    if measured:
        return ""
    what = ("cloudrun.cpu, .memory and .concurrency" if target == "cloudrun"
            else "fly.toml's [[vm]] size and memory and its soft_limit/hard_limit")  # fmt: skip
    return (f"note: {what} are defaults, not measured with this model: `invoke tune --target {target} --write` "
            "measures each instance shape and sets them (docs/sizing.md)")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise Exit(f"tune --write: cannot read {path} ({exc.strerror}): check the path (tune.record, fly.config)") from None


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".tune-partial")
    partial.write_text(text)
    partial.replace(path)  # all or nothing


# ---------------------------------------------------------------------------------------------------------------
# YAML: one top-level mapping in block style


def set_yaml_keys(text: str, section: str, values: dict[str, Any], comment: str) -> str:
    """`text` with section.key set to each value (and the run's comment above them), all else as it was."""
    before = _load_yaml(text)
    lines = text.splitlines(keepends=True)
    header = next((i for i, line in enumerate(lines) if re.match(rf"{section}:\s*(#.*)?$", line)), None)
    if header is None:
        if isinstance(before.get(section), dict) or re.search(rf"^{section}:", text, re.M):
            raise Exit(f"tune --write: {section} in the file is not a block mapping (`{section}:` then indented keys); "
                       "write it so, or set the keys by hand")
        tail = "" if not text or text.endswith("\n") else "\n"
        block = [f"{section}:\n", f"  {comment}\n", *(f"  {k}: {_yaml_value(v)}\n" for k, v in values.items())]
        new = text + tail + "".join(block)
    else:
        end = header + 1
        while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t"):
            end += 1
        body = lines[header + 1 : end]
        indent = next((re.match(r"\s+", l)[0] for l in body if l.strip() and not l.strip().startswith("#")), "  ")
        body = [l for l in body if not l.strip().startswith(MARK.strip())]
        missing = dict(values)
        for number, line in enumerate(body):
            match = re.match(rf"({indent})(\w+):(\s*)([^#\n]*?)(\s*#.*)?(\n?)$", line)
            if match and match[2] in missing:
                value = missing.pop(match[2])
                body[number] = f"{match[1]}{match[2]}: {_yaml_value(value)}{match[5] or ''}{match[6]}"
        added = [f"{indent}{comment}\n", *(f"{indent}{k}: {_yaml_value(v)}\n" for k, v in missing.items())]
        new = "".join(lines[: header + 1] + added + body + lines[end:])
    _check(before, _load_yaml(new), section, values)
    return new


def _yaml_value(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) and re.fullmatch(r"[\d.]+", value) else str(value)


def _load_yaml(text: str) -> dict:
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise Exit(f"tune --write: the file is not valid YAML ({exc}); fix it first") from None
    return loaded


def _check(before: dict, after: dict, section: str, values: dict[str, Any]) -> None:
    """Only the named keys differ, and they hold the new values: else the edit went wrong and nothing is written."""
    wanted = {**before, section: {**(before.get(section) or {}), **values}}
    if _normal(after) != _normal(wanted):
        raise Exit(f"tune --write: editing {section} would change more than {', '.join(values)}; nothing was written: "
                   "set them by hand")


def _normal(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# TOML: tables by header ("[vm]" is the first [[vm]])


def set_toml_keys(text: str, tables: dict[str, dict[str, Any]], comment: str) -> str:
    new = text
    for table, values in tables.items():
        new = _set_toml_table(new, table, values, comment)
    after = _load_toml(new)
    wanted = _load_toml(text)
    for table, values in tables.items():
        _dig(wanted, table).update(values)
    if after != wanted:
        raise Exit("tune --write: editing fly.toml would change more than the keys named; nothing was written: set "
                   f"them by hand ({', '.join(f'{t}.{k}' for t, v in tables.items() for k in v)})")
    return new


def _dig(document: dict, table: str) -> dict:
    node: Any = document
    for part in table.strip("[]").split("."):
        if table.startswith("[") and part == table.strip("[]").split(".")[-1]:
            node = node.setdefault(part, [{}])
            node = node[0]
        else:
            node = node.setdefault(part, {})
    return node


def _set_toml_table(text: str, table: str, values: dict[str, Any], comment: str) -> str:
    lines = text.splitlines(keepends=True)
    header_text = f"[{table}]"
    header = next((i for i, l in enumerate(lines) if l.strip().split("#")[0].strip() == header_text), None)
    if header is None:
        tail = "" if not text or text.endswith("\n") else "\n"
        block = ["\n", f"{header_text}\n", f"  {comment}\n", *(f"  {k} = {_toml_value(v)}\n" for k, v in values.items())]
        return text + tail + "".join(block)
    end = header + 1
    while end < len(lines) and not lines[end].lstrip().startswith("["):
        end += 1
    body = lines[header + 1 : end]
    indent = next((re.match(r"\s*", l)[0] for l in body if re.match(r"\s*\w+\s*=", l)),
                  re.match(r"\s*", lines[header])[0] + "  ")  # fmt: skip
    body = [l for l in body if not l.strip().startswith(MARK.strip())]
    missing = dict(values)
    for number, line in enumerate(body):
        match = re.match(r"(\s*)(\w+)(\s*=\s*)(\"[^\"]*\"|[^#\s]+)(\s*#.*)?(\n?)$", line)
        if match and match[2] in missing:
            body[number] = f"{match[1]}{match[2]}{match[3]}{_toml_value(missing.pop(match[2]))}{match[5] or ''}{match[6]}"
    added = [f"{indent}{comment}\n", *(f"{indent}{k} = {_toml_value(v)}\n" for k, v in missing.items())]
    return "".join(lines[: header + 1] + added + body + lines[end:])


def _toml_value(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def _load_toml(text: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise Exit(f"tune --write: the file is not valid TOML ({exc}); fix it first") from None
