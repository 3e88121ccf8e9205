"""Ollama: the run's Jinja chat template as an Ollama (Go text/template) TEMPLATE, the Modelfile, and a small
renderer of that Go template in Python so the export can prove the two templates build the same prompt.

Only ChatML-style templates (`<|im_start|>ROLE\\nCONTENT<|im_end|>\\n` per message, SmolLM2, Qwen, …) are
translated, found by rendering the run's template, not by reading its source; any other template is refused with
the reason rather than written wrong.
"""

from __future__ import annotations

import re
from typing import Any

from tunesmith.errors import RunError

START, END = "<|im_start|>", "<|im_end|>"
_PROBE = "\x00tunesmith-probe\x00"


def ollama_template(render) -> str:
    """The Go template equivalent to `render(messages) -> str` (the run's Jinja template with the generation
    prompt), or a RunError saying why there is none. A default system prompt the Jinja template inserts when the
    conversation has none is kept."""
    user = [{"role": "user", "content": _PROBE}]
    system = [{"role": "system", "content": _PROBE + "s"}]
    plain, with_system = render(user), render(system + user)
    turn = f"{START}user\n{_PROBE}{END}\n"
    head = plain.split(turn, 1)[0] if turn in plain else None
    expected_tail = f"{turn}{START}assistant\n"
    why = None
    if head is None or not plain.endswith(expected_tail) or plain != head + expected_tail:
        why = "its user turn is not `<|im_start|>user\\n…<|im_end|>\\n` followed by `<|im_start|>assistant\\n`"
    elif with_system != f"{START}system\n{_PROBE}s{END}\n" + expected_tail:
        why = "a system message is not rendered as its own `<|im_start|>system` turn"
    elif head and not re.fullmatch(rf"{re.escape(START)}system\n[^\x00]*{re.escape(END)}\n", head):
        why = f"it puts {head[:60]!r} before a conversation without a system message"
    if why:
        raise RunError(f"the run's chat template can't be translated to an Ollama TEMPLATE: {why} (only ChatML-style "
                       "templates are translated)", "use --format gguf (the GGUF keeps the Jinja template for "
                       "llama.cpp and LM Studio) and write the Modelfile's TEMPLATE yourself")
    default = head[len(START) + len("system\n"):-len(END) - 1] if head else ""
    default_turn = (f'{{{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}}}{START}system\n'
                    f"{_go_text(default)}{END}\n{{{{ end }}}}") if head else ""
    return (default_turn + f"{{{{- range .Messages }}}}{START}{{{{ .Role }}}}\n{{{{ .Content }}}}{END}\n"
            f"{{{{ end }}}}{START}assistant\n")


def _go_text(text: str) -> str:
    """`text` safe as literal Go template text (a `{{` inside becomes a printed string)."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile(template: str, stops: list[str], system_prompt: str | None, gguf_name: str = "model.gguf") -> str:
    """The Modelfile text: FROM the GGUF beside it, TEMPLATE, one `PARAMETER stop` per end-of-turn token, SYSTEM."""
    for what, text in (("chat template", template), ("system prompt", system_prompt or "")):
        if '"""' in text or text.endswith('"'):
            raise RunError(f"the run's {what} holds or ends with a double quote that a Modelfile's \"\"\"…\"\"\" "
                           "can't hold", "use --format gguf and write the Modelfile yourself")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{_quoted(s)}"' for s in stops]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def read_modelfile(text: str) -> dict[str, Any]:
    """The Modelfile's FROM, TEMPLATE, stops and SYSTEM (what `modelfile` writes), for the parity check."""
    found: dict[str, Any] = {"stops": []}
    for key in ("TEMPLATE", "SYSTEM"):
        match = re.search(rf'^{key} """(.*?)"""$', text, re.S | re.M)
        found[key.lower()] = match.group(1) if match else None
    found["from"] = (re.search(r"^FROM (.+)$", text, re.M) or [None, None])[1]
    found["stops"] = [re.sub(r"\\(.)", r"\1", m) for m in re.findall(r'^PARAMETER stop "((?:[^"\\]|\\.)*)"$',
                                                                        text, re.M)]
    return found


# ----------------------------------------------------------------------------------------------- Go templates


def render_go(template: str, messages: list[dict[str, str]], system: str | None = None) -> str:
    """Render an Ollama template the way Ollama does for a chat request: the Modelfile's SYSTEM becomes a leading
    system message when the conversation has none; `.Messages`, `.System` given. Supports the subset of Go's
    text/template that `ollama_template` writes: text, `{{- … -}}` trimming, if/else/range/end, field access,
    `(expr).Field`, string literals, integers, and the functions not, and, or, eq, ne, index."""
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages], "System": system or ""}
    nodes, rest = _parse(_tokens(template), 0, ())
    return "".join(_run(nodes, data, data))


def _tokens(template: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) pieces, with `{{-` / `-}}` trimming applied to the text around them."""
    out: list[tuple[str, str]] = []
    pos = 0
    for match in re.finditer(r"\{\{(-\s)?(.*?)(\s-)?\}\}", template, re.S):
        text = template[pos:match.start()]
        if match.group(1):
            text = text.rstrip(" \t\r\n")
        if out and out[-1] == ("trim", ""):
            out.pop()
            text = text.lstrip(" \t\r\n")
        out.append(("text", text))
        out.append(("action", match.group(2).strip()))
        if match.group(3):
            out.append(("trim", ""))
        pos = match.end()
    text = template[pos:]
    if out and out[-1] == ("trim", ""):
        out.pop()
        text = text.lstrip(" \t\r\n")
    out.append(("text", text))
    return out


def _parse(tokens, i, stop):
    """A node list from tokens[i:] up to an action in `stop`; (nodes, index of that action)."""
    nodes: list = []
    while i < len(tokens):
        kind, value = tokens[i]
        word = value.split(" ", 1)[0] if kind == "action" else ""
        if kind == "action" and word in stop:
            return nodes, i
        if kind == "text":
            nodes.append(("text", value))
        elif word in ("if", "range"):
            body, j = _parse(tokens, i + 1, ("else", "end"))
            other: list = []
            if tokens[j][1] == "else":
                other, j = _parse(tokens, j + 1, ("end",))
            nodes.append((word, value[len(word):].strip(), body, other))
            i = j
        else:
            nodes.append(("print", value))
        i += 1
    if stop:
        raise ValueError(f"template: missing {{{{ end }}}} ({' or '.join(stop)})")
    return nodes, i


def _run(nodes, dot, root) -> list[str]:
    out: list[str] = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            value = _eval(node[1], dot, root)
            out.append(value if isinstance(value, str) else str(value))
        elif node[0] == "if":
            out += _run(node[2] if _truth(_eval(node[1], dot, root)) else node[3], dot, root)
        else:  # range
            items = _eval(node[1], dot, root) or []
            for item in items:
                out += _run(node[2], item, root)
            if not items:
                out += _run(node[3], dot, root)
    return out


def _truth(value) -> bool:
    return bool(value)


_FUNCS = {"not": lambda a: not _truth(a), "eq": lambda a, b: a == b, "ne": lambda a, b: a != b,
          "index": lambda a, i: a[i]}


def _eval(expr: str, dot, root):
    """A pipeline-free Go template expression: a function call or a single operand."""
    parts = _split(expr)
    if parts[0] in _FUNCS or parts[0] in ("and", "or"):
        name = parts[0]
        if name == "or":  # Go ≥ 1.18 evaluates and/or lazily
            for part in parts[1:]:
                value = _operand(part, dot, root)
                if _truth(value):
                    return value
            return value
        if name == "and":
            for part in parts[1:]:
                value = _operand(part, dot, root)
                if not _truth(value):
                    return value
            return value
        return _FUNCS[name](*[_operand(p, dot, root) for p in parts[1:]])
    if len(parts) != 1:
        raise ValueError(f"template: can't evaluate {expr!r}")
    return _operand(parts[0], dot, root)


def _split(expr: str) -> list[str]:
    """Top-level operands: parenthesised groups (with a trailing .Field), strings, words."""
    parts, i = [], 0
    while i < len(expr):
        if expr[i].isspace():
            i += 1
            continue
        start = i
        if expr[i] == "(":
            depth = 0
            while True:
                depth += {"(": 1, ")": -1}.get(expr[i], 0)
                i += 1
                if depth == 0:
                    break
            while i < len(expr) and not expr[i].isspace():
                i += 1
        elif expr[i] == '"':
            i = expr.index('"', i + 1) + 1
        else:
            while i < len(expr) and not expr[i].isspace():
                i += 1
        parts.append(expr[start:i])
    return parts


def _operand(text: str, dot, root):
    if text.startswith("("):
        close = _matching(text)
        value = _eval(text[1:close], dot, root)
        return _fields(value, text[close + 1:])
    if text.startswith('"'):
        return text[1:-1]
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if text.startswith("$"):
        return _fields(root, text[1:])
    if text.startswith("."):
        return _fields(dot, text)
    raise ValueError(f"template: unknown operand {text!r}")


def _matching(text: str) -> int:
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return i
    raise ValueError(f"template: unbalanced {text!r}")


def _fields(value, path: str):
    for name in [p for p in path.split(".") if p]:
        value = value[name] if isinstance(value, dict) else getattr(value, name)
    return value
